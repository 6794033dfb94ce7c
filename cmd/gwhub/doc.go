// Command gwhub is the local IoT hub. `gwhub run --state-dir DIR` starts it;
// the flags map one to one onto hub.Config. It owns only flag parsing,
// logging set-up, signal handling and the start-up banner; everything else
// is package hub.
package main
