// Package local is the agent's local control channel: a unix socket in the
// state directory (StateDir/control.sock, mode 0600 in a 0700 directory,
// peers checked to be root or the agent's own user) that `gwagent commit`
// and `gwagent rollback` use to reach the running daemon, and `gwagent
// status` to ask it how its hub connection is (a read-only request, logged
// at Debug only).
//
// The protocol is one small JSON request and one JSON response per
// connection, bounded in size (MaxMessage), time (each connection has a
// deadline) and concurrency. Commit and rollback go through the daemon, never
// around it, so the update record is only ever written by the daemon's state
// machine: the CLI hands the running health check an operator verdict and
// the state machine commits or rolls back exactly as it would on its own.
//
// It owns the socket file, the wire format and the peer check. It must not
// decide anything about updates: the Handler it is given does.
package local
