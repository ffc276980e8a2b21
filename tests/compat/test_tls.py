"""TLS seen by a third-party client: grpcio with `ssl_channel_credentials(root_certificates=...)`
against a node serving TLS on its client port (issue 16).

The CA and the node's certificate are made with the `openssl` commands of docs/configuration.md's
worked example, run as written, so the documented example is tested too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from conftest import single_node_only
from myelin_harness import EventStore, MyelinNode, event, unique

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

pytestmark = single_node_only("one node serving TLS, made for this module")


def documented_commands() -> list[str]:
    """The shell lines of the TLS example's first `sh` block."""
    section = DOCS.read_text().split("### Example: a test CA and a node serving TLS", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tls(request, tmp_path_factory):
    """(node, CA certificate PEM) for a node whose client port serves TLS."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    files = tmp_path_factory.mktemp("tls")
    commands = documented_commands()
    assert any(c.startswith("openssl x509") for c in commands), commands
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=files, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"
    node = MyelinNode(
        {
            "axoniq.axonserver.ssl.enabled": "true",
            "axoniq.axonserver.ssl.cert-chain-file": str(files / "node.crt"),
            "axoniq.axonserver.ssl.private-key-file": str(files / "node.key"),
        }
    )
    request.addfinalizer(node.stop)
    try:
        node.start()
    except Exception as exc:  # noqa: BLE001 - the log says why
        pytest.fail(f"could not start Myelin with TLS: {exc}", pytrace=False)
    return node, (files / "ca.crt").read_bytes()


def test_a_client_with_the_ca_appends_and_reads(tls):
    node, ca = tls
    assert node.me()["ssl"] is True
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(node.uri, credentials) as channel:
        store = EventStore(channel, "default")
        aggregate = unique("tls")
        store.append([event(aggregate, 0), event(aggregate, 1)])
        assert [e.aggregate_sequence_number for e in store.aggregate(aggregate)] == [0, 1]


def test_a_client_without_the_ca_or_without_tls_gets_nothing(tls):
    node, _ = tls
    # The system's roots do not include the test CA.
    with grpc.secure_channel(node.uri, grpc.ssl_channel_credentials()) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            EventStore(channel, "default").last_token()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(node.uri) as channel:
        with pytest.raises(grpc.RpcError) as plaintext:
            EventStore(channel, "default").last_token()
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
