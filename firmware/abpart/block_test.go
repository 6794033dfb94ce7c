package abpart

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/gwagent/gwagent/firmware/bootenv"
)

// loopDevice attaches file to a free loop device and detaches it at the end
// of the test.
func loopDevice(t *testing.T, file string) string {
	t.Helper()
	out, err := exec.Command("losetup", "-f", "--show", file).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "could not find any free loop device") {
			t.Skipf("no free loop device (only loop0-7 exist here): %s", out)
		}
		t.Fatalf("losetup -f --show %s: %v: %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// TestBlockDevices runs an update on real block devices (loop devices over
// the slot files): the size comes from the device, the running slot from
// root=/dev/loopN, and a slot claimed exclusively elsewhere (as a mounted
// one is) is refused.
func TestBlockDevices(t *testing.T) {
	requireTools(t, "losetup")
	ctx := t.Context()
	d := newDevice(t, "uboot")
	for _, s := range []string{"A", "B"} {
		d.slots[s] = loopDevice(t, d.slots[s])
	}
	d.slotType = SlotTypeBlock
	if err := os.WriteFile(d.cmdline, []byte("console=ttyS0 root="+d.slots["A"]+" rootwait\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d.guard("A")
	inst := d.installer()
	if r, err := inst.runningSlot(); err != nil || r != "A" {
		t.Fatalf("running slot from root=%s: %q, %v", d.slots["A"], r, err)
	}
	if c, err := inst.capacity("B"); err != nil || c != slotSize {
		t.Fatalf("capacity of %s = %d, %v; want %d", d.slots["B"], c, err, slotSize)
	}

	// Claimed elsewhere: the O_EXCL open fails.
	holder, err := os.OpenFile(d.slots["B"], os.O_RDONLY|syscall.O_EXCL, 0)
	if err != nil {
		t.Fatal(err)
	}
	img := newImage(t, 512<<10)
	if _, err := inst.Open(ctx, img.u, 0); err == nil || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("Open of a claimed device = %v, want busy", err)
	}
	if err := inst.Prepare(ctx, img.u); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("Prepare with a claimed device = %v, want in use", err)
	}
	holder.Close()

	if err := d.write(inst, img); err != nil {
		t.Fatal(err)
	}
	u := d.readBack(inst, img)
	if err := inst.Apply(ctx, u); err != nil {
		t.Fatal(err)
	}
	if d.boot() != "B" {
		t.Fatal("did not boot B")
	}
	inst = d.installer()
	if err := inst.VerifyBoot(ctx, u); err != nil {
		t.Fatal(err)
	}
	if err := inst.Commit(ctx, u); err != nil {
		t.Fatal(err)
	}
	if st := d.state(); st != (bootenv.State{Slot: "B", BootLimit: 3}) {
		t.Fatalf("after commit: %+v", st)
	}
	b, err := os.ReadFile(d.slots["B"])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[:len(img.data)], img.data) {
		t.Fatal("slot B does not hold the image")
	}
}
