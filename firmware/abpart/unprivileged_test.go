package abpart

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/firmware"
)

// TestSizeOfAnUnopenableSlot: run unprivileged, the agent may open only the
// inactive slot. Check still compares an image with both slots, so the size
// of the running one comes from sysfs. The running slot here is a device
// node on a nodev mount, which nobody, root included, may open: EACCES, as
// the agent's user gets.
func TestSizeOfAnUnopenableSlot(t *testing.T) {
	requireTools(t, "losetup")
	d := newDevice(t, "file")
	for _, s := range []string{"A", "B"} {
		d.slots[s] = loopDevice(t, d.slots[s])
	}
	nodev := filepath.Join(t.TempDir(), "nodev")
	if err := os.Mkdir(nodev, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", nodev, "tmpfs", unix.MS_NODEV|unix.MS_NOSUID, "size=64k"); err != nil {
		t.Fatalf("mount a nodev tmpfs (the test needs root): %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(nodev, 0); err != nil {
			t.Errorf("unmount %s: %v", nodev, err)
		}
	})
	var st unix.Stat_t
	if err := unix.Stat(d.slots["A"], &st); err != nil {
		t.Fatal(err)
	}
	node := filepath.Join(nodev, "running")
	if err := unix.Mknod(node, unix.S_IFBLK|0o600, int(st.Rdev)); err != nil {
		t.Fatal(err)
	}
	if f, err := os.Open(node); !errors.Is(err, fs.ErrPermission) {
		if err == nil {
			f.Close()
		}
		t.Fatalf("open of a device node on a nodev mount = %v, want a permission error", err)
	}
	d.slots["A"] = node
	d.slotType = SlotTypeBlock
	inst := d.installer()

	for _, s := range []string{"A", "B"} {
		if c, err := inst.capacity(s); err != nil || c != slotSize {
			t.Fatalf("capacity of slot %s = %d, %v; want %d", s, c, err, slotSize)
		}
	}
	if err := inst.Check(firmware.Request{Size: slotSize}); err != nil {
		t.Fatalf("Check of an image as large as the slots: %v", err)
	}
	if err := inst.Check(firmware.Request{Size: slotSize + 1}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Check of an image larger than the slots = %v, want ErrTooLarge", err)
	}

	// Only a permission error is answered from sysfs: a node that is gone
	// is an error, not a size.
	if err := os.Remove(node); err != nil {
		t.Fatal(err)
	}
	if _, err := inst.capacity("A"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("capacity of a missing node = %v, want ErrNotExist", err)
	}
}
