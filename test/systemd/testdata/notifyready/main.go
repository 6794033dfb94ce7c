// Command notifyready is the baseline of the start-to-READY measurement: a Go
// program that does nothing but tell systemd it is ready, run in the same
// sandbox as gwagent. Its time is what any Go notify service costs there.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	if ok, err := daemon.SdNotify(false, daemon.SdNotifyReady); !ok || err != nil {
		fmt.Fprintln(os.Stderr, "notifyready: READY not sent:", err)
		os.Exit(1)
	}
	<-stop
}
