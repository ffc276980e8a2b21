//! TLS on a node's ports (issue 16), with the real binaries and a CA the test makes: clients
//! that trust the CA get through, clients that do not are refused, a setting that cannot be
//! honoured stops the node before anything serves, and certificates are replaced without a
//! restart.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use myelin_proto::axon::event::event_store_client::EventStoreClient;
use myelin_tests::tls::{self, Issued, TestCa};
use myelin_tests::{Node, Options, append, event, read_all};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The environment of a node serving TLS on the client port with `grpc` and on the HTTP port
/// with `http`.
fn tls_env(grpc: &Issued, http: Option<&Issued>) -> Vec<(String, String)> {
    let mut env = vec![
        ("AXONIQ_AXONSERVER_SSL_ENABLED".to_owned(), "true".to_owned()),
        (
            "AXONIQ_AXONSERVER_SSL_CERT_CHAIN_FILE".to_owned(),
            grpc.cert.display().to_string(),
        ),
        (
            "AXONIQ_AXONSERVER_SSL_PRIVATE_KEY_FILE".to_owned(),
            grpc.key.display().to_string(),
        ),
    ];
    if let Some(http) = http {
        env.push(("SERVER_SSL_CERTIFICATE".to_owned(), http.cert.display().to_string()));
        env.push((
            "SERVER_SSL_CERTIFICATE_PRIVATE_KEY".to_owned(),
            http.key.display().to_string(),
        ));
    }
    env
}

/// A GET over HTTPS trusting `ca` (or nothing at all when `ca` is `None`): (status, body), or
/// the transport error.
async fn https_get(port: u16, path: &str, ca: Option<&str>) -> Result<(u16, String), String> {
    let url = format!("https://127.0.0.1:{port}{path}");
    let ca = ca.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let roots = match &ca {
            Some(pem) => ureq::tls::RootCerts::Specific(Arc::new(vec![
                ureq::tls::Certificate::from_pem(pem.as_bytes()).unwrap().to_owned(),
            ])),
            None => ureq::tls::RootCerts::Specific(Arc::new(Vec::new())),
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
            .build()
            .into();
        let mut response = agent.get(&url).call().map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        Ok((status, response.body_mut().read_to_string().unwrap_or_default()))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn clients_that_trust_the_ca_get_through_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("myelin test CA");
    let grpc = ca.issue(dir.path(), "grpc", 2100);
    let http = ca.issue(dir.path(), "http", 2100);
    let node = Node::start(Options {
        env: tls_env(&grpc, Some(&http)),
        tls_ca: Some(ca.pem.clone()),
        ..Options::default()
    })
    .await;

    // A client with the CA appends and reads.
    let mut client = node.client().await;
    append(&mut client, vec![event("order-1", 0, "e0"), event("order-1", 1, "e1")])
        .await
        .unwrap();
    let read = read_all(&mut client).await;
    assert_eq!(
        read.iter()
            .map(|(_, e)| e.message_identifier.as_str())
            .collect::<Vec<_>>(),
        ["e0", "e1"]
    );

    // A client trusting another CA fails the handshake; a plaintext client gets nothing.
    let stranger = TestCa::new("another CA");
    assert!(tls::channel(node.grpc_port, &stranger.pem).await.is_err());
    let plaintext = tonic::transport::Channel::from_shared(node.url())
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let answer = EventStoreClient::new(channel)
            .get_last_token(myelin_proto::axon::event::GetLastTokenRequest {})
            .await;
        assert!(answer.is_err(), "a plaintext call was answered: {answer:?}");
    }

    // HTTPS: /v1/public/me says TLS is on, for gRPC (Axon's `ssl`) and for HTTP.
    let (status, body) = https_get(node.http_port, "/v1/public/me", Some(&ca.pem)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let me: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (me["ssl"].as_bool(), me["httpSsl"].as_bool()),
        (Some(true), Some(true)),
        "{me}"
    );
    let refused = https_get(node.http_port, "/v1/public/me", None).await;
    assert!(refused.is_err(), "{refused:?}");
    let url = format!("http://127.0.0.1:{}/v1/public/me", node.http_port);
    let plain = tokio::task::spawn_blocking(move || ureq::get(&url).call().map(|r| r.status()))
        .await
        .unwrap();
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
}

#[tokio::test]
async fn a_node_without_tls_says_so() {
    let node = Node::start(Options::default()).await;
    let me = myelin_tests::http::request(node.http_port, "GET", "/v1/public/me", None, None).await;
    assert_eq!(me.json()["ssl"], false);
    assert_eq!(me.json()["httpSsl"], false);
}

/// Runs `myelin` with `env` until it exits (it must, within 20 s): (exit code, output).
fn run_until_exit(dir: &Path, env: &[(String, String)]) -> (Option<i32>, String) {
    let ports = myelin_tests::free_ports(3);
    let mut child = Command::new(myelin_tests::binary())
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--bind-address", "127.0.0.1"])
        .args(["--port", &ports[0].to_string()])
        .args(["--http-port", &ports[1].to_string()])
        .args(["--internal-port", &ports[2].to_string()])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("RUNTIME_DIRECTORY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("myelin kept running with an unusable TLS setting");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

#[test]
fn a_setting_that_cannot_be_honoured_stops_the_node_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("myelin test CA");
    let good = ca.issue(dir.path(), "good", 2100);
    let other = ca.issue(dir.path(), "other", 2100);
    let expired = ca.issue(dir.path(), "expired", 2001);
    let missing = dir.path().join("missing.key");

    // (what, the node's environment, what its message must say)
    type Case = (&'static str, Vec<(String, String)>, String);
    let cases: Vec<Case> = vec![
        (
            "missing key file",
            tls_env(
                &Issued {
                    key: missing.clone(),
                    ..good.clone()
                },
                None,
            ),
            format!(
                "axoniq.axonserver.ssl.private-key-file: cannot read {}: No such file",
                missing.display()
            ),
        ),
        (
            "key of another certificate",
            tls_env(
                &Issued {
                    key: other.key.clone(),
                    ..good.clone()
                },
                None,
            ),
            format!(
                "axoniq.axonserver.ssl.private-key-file: the private key in {} does not match the certificate in {}",
                other.key.display(),
                good.cert.display()
            ),
        ),
        (
            "expired certificate",
            tls_env(&expired, None),
            format!(
                "axoniq.axonserver.ssl.cert-chain-file: the certificate in {} expired at 2001-01-01T00:00:00Z",
                expired.cert.display()
            ),
        ),
        (
            "not PEM",
            tls_env(
                &Issued {
                    cert: dir.path().join("good.key"),
                    ..good.clone()
                },
                None,
            ),
            format!(
                "axoniq.axonserver.ssl.cert-chain-file: {} holds no PEM certificate",
                good.key.display()
            ),
        ),
        (
            "enabled without a certificate",
            vec![("AXONIQ_AXONSERVER_SSL_ENABLED".to_owned(), "true".to_owned())],
            "axoniq.axonserver.ssl.cert-chain-file must be set when axoniq.axonserver.ssl.enabled is true".to_owned(),
        ),
        (
            "HTTP keystore",
            vec![("SERVER_SSL_KEY_STORE".to_owned(), "/etc/keystore.p12".to_owned())],
            "server.ssl.key-store is set, but Myelin reads no keystores".to_owned(),
        ),
        (
            "HTTP key file missing",
            vec![
                ("SERVER_SSL_CERTIFICATE".to_owned(), good.cert.display().to_string()),
                (
                    "SERVER_SSL_CERTIFICATE_PRIVATE_KEY".to_owned(),
                    missing.display().to_string(),
                ),
            ],
            format!("server.ssl.certificate-private-key: cannot read {}", missing.display()),
        ),
    ];
    for (what, env, message) in cases {
        let (code, output) = run_until_exit(dir.path(), &env);
        assert_eq!(code, Some(2), "{what}: {output}");
        assert!(output.contains(&message), "{what}: expected {message:?} in:\n{output}");
        // Nothing was started: no child wrote a pid file.
        assert!(!dir.path().join("data/run/router.pid").exists(), "{what}");
    }
}

/// Waits until the port serves `expected` (DER).
async fn wait_served(port: u16, ca: &str, expected: &[u8], node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if tls::served_certificate(port, ca).await.ok().as_deref() == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "port {port} did not serve the new certificate; log:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn certificates_are_replaced_on_sighup_or_a_change_and_a_bad_replacement_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("myelin test CA");
    let grpc = ca.issue(dir.path(), "grpc", 2100);
    let http = ca.issue(dir.path(), "http", 2100);
    let node = Node::start(Options {
        env: tls_env(&grpc, Some(&http)),
        tls_ca: Some(ca.pem.clone()),
        ..Options::default()
    })
    .await;
    let first = tls::der(&grpc.cert_pem);
    assert_eq!(tls::served_certificate(node.grpc_port, &ca.pem).await.unwrap(), first);

    // New files in place (as a rotation writes them), then SIGHUP to the supervisor.
    let scratch = tempfile::tempdir().unwrap();
    let renewed = ca.issue(scratch.path(), "renewed", 2099);
    std::fs::copy(&renewed.key, &grpc.key).unwrap();
    std::fs::copy(&renewed.cert, &grpc.cert).unwrap();
    let renewed_http = ca.issue(scratch.path(), "renewed-http", 2099);
    std::fs::copy(&renewed_http.key, &http.key).unwrap();
    std::fs::copy(&renewed_http.cert, &http.cert).unwrap();
    kill(Pid::from_raw(node.supervisor_pid().unwrap()), Signal::SIGHUP).unwrap();
    wait_served(node.grpc_port, &ca.pem, &tls::der(&renewed.cert_pem), &node).await;
    wait_served(node.http_port, &ca.pem, &tls::der(&renewed_http.cert_pem), &node).await;
    // The node still serves, and nobody was restarted for it.
    let mut client = node.client().await;
    append(&mut client, vec![event("order-2", 0, "after-reload")])
        .await
        .unwrap();
    assert!(!node.log_text().contains("restarting"), "{}", node.log_text());

    // A broken replacement: the node keeps serving the certificate it has, and says why.
    std::fs::write(&grpc.cert, "not a certificate").unwrap();
    kill(Pid::from_raw(node.supervisor_pid().unwrap()), Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !node.log_text().contains("kept the TLS certificate in use") {
        assert!(Instant::now() < deadline, "no warning; log:\n{}", node.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        node.log_text().contains("holds no PEM certificate"),
        "{}",
        node.log_text()
    );
    assert_eq!(
        tls::served_certificate(node.grpc_port, &ca.pem).await.unwrap(),
        tls::der(&renewed.cert_pem)
    );

    // A good pair written without a signal (as certbot or a secrets agent would) is found by
    // looking at the files.
    let third = ca.issue(scratch.path(), "third", 2098);
    std::fs::copy(&third.key, &grpc.key).unwrap();
    std::fs::copy(&third.cert, &grpc.cert).unwrap();
    wait_served(node.grpc_port, &ca.pem, &tls::der(&third.cert_pem), &node).await;
    assert!(
        node.log_text()
            .contains("reloaded the TLS certificate (the files changed)"),
        "{}",
        node.log_text()
    );
}

/// A tool next to the `myelin` binary under test.
fn tool(name: &str) -> std::path::PathBuf {
    let path = myelin_tests::binary().with_file_name(name);
    assert!(path.exists(), "{} missing: build the workspace first", path.display());
    path
}

/// Runs a tool with `args` in an empty directory: (exit code, stdout, stderr).
fn run_tool(name: &str, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(tool(name))
        .args(args)
        .current_dir(dir.path())
        .env_remove("MYELIN_SERVER")
        .env_remove("MYELIN_TOKEN")
        .env_remove("MYELIN_TOKEN_FILE")
        .env_remove("MYELIN_CA_FILE")
        .output()
        .unwrap();
    (
        output.status.code().expect("exited"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_and_the_backup_agent_speak_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("myelin test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let ca_file = ca_file.to_str().unwrap();
    let http = ca.issue(dir.path(), "http", 2100);
    let node = Node::start(Options {
        env: vec![
            ("SERVER_SSL_CERTIFICATE".to_owned(), http.cert.display().to_string()),
            (
                "SERVER_SSL_CERTIFICATE_PRIVATE_KEY".to_owned(),
                http.key.display().to_string(),
            ),
        ],
        ..Options::default()
    })
    .await;
    let plain_url = format!("http://127.0.0.1:{}", node.http_port);
    let https_url = format!("https://127.0.0.1:{}", node.http_port);

    let cli = |args: &[&str]| {
        let mut all = vec!["contexts", "-o", "json"];
        all.extend_from_slice(args);
        run_tool("myelin-cli", &all)
    };
    // -s turns the http:// URL into https://; the CA file verifies the node.
    let (code, stdout, stderr) = cli(&["-S", &plain_url, "-s", "--ca-file", ca_file]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("\"default\""), "{stdout}");
    let (code, stdout, stderr) = cli(&["-S", &https_url, "--ca-file", ca_file]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Without the CA the node's certificate is not trusted: unreachable (3), saying why.
    let (code, _, stderr) = cli(&["-S", &plain_url, "--https"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("TLS failed") && stderr.contains("--ca-file"),
        "{stderr}"
    );
    // Plain HTTP to an HTTPS port says what to do.
    let (code, _, stderr) = cli(&["-S", &plain_url]);
    assert_eq!(code, 3, "{stderr}");
    // -i: no verification, with a warning.
    let (code, stdout, stderr) = cli(&["-S", &plain_url, "-s", "-i"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("not verified"), "{stderr}");

    // The backup agent, the same flags.
    let dest = dir.path().join("backup");
    let dest = dest.to_str().unwrap();
    let (code, stdout, stderr) = run_tool(
        "myelin-backup-agent",
        &["backup", "-q", "-S", &plain_url, "--dest", dest],
    );
    assert_eq!(code, 3, "{stdout}{stderr}");
    let (code, _, stderr) = run_tool(
        "myelin-backup-agent",
        &["backup", "-q", "-S", &plain_url, "-s", "--dest", dest],
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("TLS failed"), "{stderr}");
    let (code, stdout, stderr) = run_tool(
        "myelin-backup-agent",
        &[
            "backup",
            "-q",
            "-S",
            &plain_url,
            "-s",
            "--ca-file",
            ca_file,
            "--dest",
            dest,
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, stdout, stderr) = run_tool("myelin-backup-agent", &["verify", "-q", dest]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}
