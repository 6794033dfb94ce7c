//go:build race

package agente2e

// The agent binary is built with the race detector when the tests are, so
// races in the daemon fail the tests that provoke them.
func init() { raceEnabled = true }
