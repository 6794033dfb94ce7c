package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/term"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	a := &app{
		stdout:     os.Stdout,
		stderr:     os.Stderr,
		getenv:     os.Getenv,
		isTerminal: func() bool { return term.IsTerminal(int(os.Stdout.Fd())) },
	}
	code := a.run(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}
