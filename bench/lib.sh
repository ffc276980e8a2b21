# Shell helpers shared by the bench scripts (sourced, not run).

# Prints a port nothing listens on at a loopback address (default 127.0.0.1).
free_port() {
    local p host="${1:-127.0.0.1}"
    while :; do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/$host/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
}

# Makes the script's `cleanup` run however it ends; a signal ends it with the usual status.
trap_cleanup() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
