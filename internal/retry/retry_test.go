package retry

import (
	"testing"
	"time"
)

func TestNewBackoffGrowsWithinJitterAndCap(t *testing.T) {
	b := NewBackoff(100*time.Millisecond, time.Second)
	nominal := 100 * time.Millisecond
	for i := range 10 {
		d := Next(b)
		lo := time.Duration(float64(min(nominal, time.Second)) * (1 - Jitter))
		hi := min(time.Duration(float64(nominal)*(1+Jitter)), time.Second)
		if d < lo || d > hi {
			t.Errorf("wait %d = %s, want within [%s, %s]", i, d, lo, hi)
		}
		nominal = min(nominal*Multiplier, time.Second)
	}
	b.Reset()
	if d := Next(b); d > 150*time.Millisecond {
		t.Errorf("after Reset the wait is %s, want near the initial 100ms", d)
	}
}

func TestNewBackoffRaisesMaxToInitial(t *testing.T) {
	b := NewBackoff(time.Second, time.Millisecond)
	if b.MaxInterval != time.Second {
		t.Errorf("MaxInterval = %s, want the initial 1s", b.MaxInterval)
	}
}
