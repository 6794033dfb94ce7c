package logging

import _ "unsafe" // for go:linkname

// journalSocket is the socket path journal.Send writes to. go-systemd sets it
// only at link time; the tests point it at a stand-in journald in a temp dir so
// that the real wire format is checked on machines without journald.
//
//go:linkname journalSocket github.com/coreos/go-systemd/v22/journal.journalSocket
var journalSocket string
