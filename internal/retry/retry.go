// Package retry is gwagent's one retry policy: capped exponential backoff
// with jitter, from cenkalti/backoff, so that every retry loop (hub
// connects, twin reads, downloads, service calls, health polls) backs off
// the same way.
package retry

import (
	"time"

	"github.com/cenkalti/backoff/v5"
)

// Multiplier and Jitter shape every backoff: each wait doubles, and is
// drawn within ±50 % of its nominal value so that a fleet that lost its hub
// at once does not come back at once.
const (
	Multiplier = 2
	Jitter     = 0.5
)

// NewBackoff returns a backoff that starts near initial and doubles up to
// max, with jitter. It never gives up by itself: callers bound it with a
// context or backoff.WithMaxElapsedTime. Reset it after a success.
func NewBackoff(initial, max time.Duration) *backoff.ExponentialBackOff {
	if max < initial {
		max = initial
	}
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = initial
	b.MaxInterval = max
	b.Multiplier = Multiplier
	b.RandomizationFactor = Jitter
	b.Reset()
	return b
}

// Next is b's next wait, capped at max: the jitter is applied after the cap
// inside the library, so a wait can otherwise exceed it by half.
func Next(b *backoff.ExponentialBackOff) time.Duration {
	return min(b.NextBackOff(), b.MaxInterval)
}
