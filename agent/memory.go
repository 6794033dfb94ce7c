package agent

import (
	"runtime/debug"

	"github.com/gwagent/gwagent/firmware"
)

// observeUpdate is the state machine's Observer: the reporter turns the
// progress into reported patches; then, when the update has ended or is
// about to reboot the device, the memory it used goes back to the OS.
func (a *Agent) observeUpdate(p firmware.Progress) {
	a.observeFirmware(p)
	if p.Phase.Terminal() {
		a.kickDesired() // a desired update may be waiting for this one
	}
	if updateEnded(p) {
		// An update allocates a few hundred KB to a few MB (download and
		// decode buffers, TLS, hashing, patches) that become garbage when
		// it ends. The runtime keeps freed pages for reuse up to about its
		// heap goal (4 MB at least), and an idle agent allocates so little
		// that no collection would come to return them: they would stay
		// resident. One collection and scavenge per update, on
		// the state machine's goroutine, which has nothing left to do for
		// it; with a heap this small it takes a few ms.
		debug.FreeOSMemory()
	}
}

// updateEnded reports the progress after which an update allocates nothing
// more in this process: a terminal state, or the reboot request (the device
// restarts; should the reboot not come, the state machine only waits).
func updateEnded(p firmware.Progress) bool {
	return p.Phase.Terminal() || p.Phase == firmware.PhaseRebooting
}
