// Package testutil holds the helpers that gwagent's tests share. It is
// imported by _test.go files only.
package testutil

import (
	"testing"
	"time"
)

// Poll is how often Eventually checks its condition.
const Poll = 10 * time.Millisecond

// Eventually polls cond until it holds, failing the test with what after d.
// It is for conditions that another goroutine or process makes true; a test
// that something does not happen uses testing/synctest instead.
func Eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	tick := time.NewTicker(Poll)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("timed out after %s waiting for %s", d, what)
		case <-tick.C:
		}
	}
}
