// The etcd server of bench/compare.sh's `etcd-3` rows, built from etcd's published server module
// at the version go.mod names. `go install go.etcd.io/etcd/server/v3@VERSION` refuses that module
// (its go.mod has replace directives), so this main package of our own calls its entry point;
// the binary is etcd's own server, flags and all.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
