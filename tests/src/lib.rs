//! Harness for multi-process tests: starts real `myelin` nodes in temp dirs on loopback ports.
