// Package agente2e holds the end-to-end tests of gwagent against a real
// local hub: the gwagent binary, built once by TestMain, runs as a separate
// process (configured by a YAML file and GWAGENT_ environment variables, as
// under systemd) against an in-process hub.Hub on loopback ports, with a real
// HTTP image server. Each test asserts the device twin's truth as a user
// would read it: the reported patches the hub accepted, in order, and the
// twin they leave.
//
// The tests cover what only a whole system shows: the happy path through the
// binary, a hub restarted mid-update, the agent killed with SIGKILL while
// reported patches are pending, a hub answering 429 and 500 to reported
// patches, a desired change made while the agent was offline, and SAS token
// renewal before the hub's expiry. Method status codes, single-process
// desired handling and the parts' own behaviour are tested in their
// packages.
//
// This package must not reach beyond loopback, sleep instead of waiting for
// a condition, or leave processes behind: every agent it starts is stopped
// or killed by its PID.
package agente2e
