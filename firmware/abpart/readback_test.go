package abpart

import (
	"context"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/gwagent/gwagent/firmware"
)

// corruptingInstaller is the real installer whose sink, inside the Sync
// that first covers byte at, changes that byte on the medium once the real
// Sync has returned: the window is synced, its read-back not yet done (the
// state machine reads a window back only after its Sync returns). medium is
// the file that holds the slot's bytes: the slot file itself, or for a loop
// device its backing file, written behind the device's page cache.
type corruptingInstaller struct {
	*Installer
	t      *testing.T
	medium string
	at     int64

	mu   sync.Mutex
	done bool
}

func (c *corruptingInstaller) Open(ctx context.Context, u firmware.Update, offset int64) (firmware.Sink, error) {
	s, err := c.Installer.Open(ctx, u, offset)
	if err != nil {
		return nil, err
	}
	return &corruptingSink{Sink: s, c: c, written: offset}, nil
}

type corruptingSink struct {
	firmware.Sink
	c       *corruptingInstaller
	mu      sync.Mutex // Write and Sync run on different goroutines
	written int64
}

func (s *corruptingSink) Write(p []byte) (int, error) {
	n, err := s.Sink.Write(p)
	s.mu.Lock()
	s.written += int64(n)
	s.mu.Unlock()
	return n, err
}

func (s *corruptingSink) Sync() error {
	s.mu.Lock()
	covered := s.written // every Write that returned before Sync started
	s.mu.Unlock()
	if err := s.Sink.Sync(); err != nil {
		return err
	}
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done || covered <= c.at {
		return nil
	}
	c.done = true
	f, err := os.OpenFile(c.medium, os.O_RDWR, 0)
	if err != nil {
		c.t.Errorf("corrupt the medium: %v", err)
		return nil
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, c.at); err != nil {
		c.t.Errorf("corrupt the medium: %v", err)
		return nil
	}
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b, c.at); err != nil {
		c.t.Errorf("corrupt the medium: %v", err)
		return nil
	}
	if err := f.Sync(); err != nil {
		c.t.Errorf("corrupt the medium: %v", err)
	}
	return nil
}

func (c *corruptingInstaller) corrupted() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.done
}

// TestCorruptedMediumCaughtBeforeSwitch: a byte of the slot changes on the
// medium after its window was written and synced, while the rest of the
// image still streams in. The read-back behind the download reads it from
// the medium, the update fails in verification and the bootloader is never
// pointed at the slot.
//
// With a plain slot file the change goes through the same page cache the
// read-back uses, so this shows only that the read-back catches it. With a
// loop device the change is made to the backing file, behind the device's
// page cache, which still holds the bytes as written: a read-back served
// from that cache would find nothing wrong, so this also shows that the
// read-back reads the medium.
func TestCorruptedMediumCaughtBeforeSwitch(t *testing.T) {
	for _, kind := range []string{"file", "loop device"} {
		t.Run(kind, func(t *testing.T) {
			d := newDevice(t, "grub")
			medium := d.slots["B"]
			if kind == "loop device" {
				requireTools(t, "losetup")
				for _, s := range []string{"A", "B"} {
					d.slots[s] = loopDevice(t, d.slots[s])
				}
				d.slotType = SlotTypeBlock
				if err := os.WriteFile(d.cmdline, []byte("console=ttyS0 root="+d.slots["A"]+" rootwait\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			d.guard("A")
			var ci *corruptingInstaller
			d.wrap = func(i *Installer) firmware.Installer {
				ci = &corruptingInstaller{Installer: i, t: t, medium: medium, at: 300<<10 + 17}
				return ci
			}
			data := randomBytes(t, 700<<10)
			a := d.startAgent(t, nil)
			if _, err := a.m.Start(request(serveImage(t, data), data)); err != nil {
				t.Fatal(err)
			}
			if a.waitRebootOrEnd(t) {
				t.Fatal("rebooted into a slot whose medium was corrupted")
			}
			if !ci.corrupted() {
				t.Fatal("the test did not corrupt the medium")
			}
			final, phases := a.result()
			if final == nil || final.Phase != firmware.PhaseFailed || final.Err == nil || final.Err.Code != firmware.CodeVerify ||
				!strings.Contains(final.Err.Message, "sha256 mismatch") {
				t.Fatalf("final %+v, phases %v; want failed with %s and a sha256 mismatch", final, phases, firmware.CodeVerify)
			}
			if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
				t.Fatalf("bootloader environment changed: %+v", st)
			}
			t.Logf("failed as it should: %s", final.Err.Message)
		})
	}
}
