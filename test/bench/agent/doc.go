// Command agent measures the gwagent daemon as a process, for `make bench`
// (test/bench/agent.sh builds and runs it): idle memory after a minute
// connected to a local hub, CPU time and wakeups while idle, memory after
// one and after many updates run one after another, and direct method
// latency while an update is downloading, each next to a baseline from the
// same run (the Debian mender-client daemon idling on the same machine; the
// agent's own idle memory; the same method call while the agent is idle).
//
// It starts an in-process hub on loopback, registers a device through the
// service REST API, starts the gwagent binary given with -gwagent against it
// and reads the kernel's figures from /proc. It must not change the agent:
// it only drives it from the outside, as an operator would.
package main
