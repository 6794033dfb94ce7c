// Package simulated is the firmware backend of the tutorial: timed stages
// (stand-by, downloading, applying, completed) that touch no device. An
// http(s) fwPackageUri is really downloaded by the state machine (bytes are
// counted, hashed and discarded, so size and sha256 checks are real); any
// other URI, like the tutorial's "test.com", is downloaded by time only.
// Failure injection (Config.FailAt) drives the failed path in tests and
// demos, and Rebooter is a reboot that only logs.
//
// It must not write anything outside Config.StateDir, where it keeps the
// simulated current version.
package simulated
