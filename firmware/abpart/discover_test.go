package abpart

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/firmware/bootenv"
)

// TestFindSlotsOnGPTDisk: on a real GPT disk (a loop device over an image
// laid out as the reference disk: boot, rootA, rootB, data), the slots are
// found by partition name with no slot setting, and are the partitions
// themselves (their size is the partition's). There is no udev here, so
// the test links the partitions by name as udev's persistent-storage rules
// do, from the name blkid reads in the partition table.
func TestFindSlotsOnGPTDisk(t *testing.T) {
	requireTools(t, "losetup", "sfdisk", "partx", "blkid")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 12<<20); err != nil {
		t.Fatal(err)
	}
	layout := "label: gpt\nsize=1MiB, name=boot\nsize=3MiB, name=rootA\nsize=3MiB, name=rootB\nsize=2MiB, name=data\n"
	sf := exec.Command("sfdisk", "-q", img)
	sf.Stdin = strings.NewReader(layout)
	if out, err := sf.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v: %s", err, out)
	}
	disk := loopDevice(t, img)
	// partx -u adds the partitions (losetup -P does not scan here) and
	// keeps working if an earlier run left some; -d removes them before
	// the detach, which does not.
	run(t, "partx", "-u", disk)
	t.Cleanup(func() { _ = exec.Command("partx", "-d", disk).Run() })

	byLabel := filepath.Join(dir, "by-partlabel")
	if err := os.Mkdir(byLabel, 0o755); err != nil {
		t.Fatal(err)
	}
	for n := 1; n <= 4; n++ {
		part := fmt.Sprintf("%sp%d", disk, n)
		out, err := exec.Command("blkid", "-p", "-o", "value", "-s", "PART_ENTRY_NAME", part).Output()
		if err != nil {
			t.Fatalf("blkid %s: %v", part, err)
		}
		if err := os.Symlink(part, filepath.Join(byLabel, strings.TrimSpace(string(out)))); err != nil {
			t.Fatal(err)
		}
	}

	cmdline := filepath.Join(dir, "cmdline")
	if err := os.WriteFile(cmdline, []byte("ro root=PARTLABEL=rootB console=ttyS0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	env := openEnv(t, "file", dir, map[string]string{bootenv.VarSlot: "B"})
	cfg := Config{PartlabelDir: byLabel, CmdlinePath: cmdline, StateDir: filepath.Join(dir, "state")}
	i, err := check(cfg, Deps{Env: env})
	if err != nil {
		t.Fatal(err)
	}
	for slot, label := range map[string]string{"A": "rootA", "B": "rootB"} {
		if got, want := i.paths[slot], filepath.Join(byLabel, label); got != want {
			t.Errorf("slot %s is %s, want %s", slot, got, want)
		}
		if c, err := i.capacity(slot); err != nil || c != 3<<20 {
			t.Errorf("capacity of slot %s = %d, %v; want the partition's %d", slot, c, err, 3<<20)
		}
	}
	if r, err := i.runningSlot(); err != nil || r != "B" {
		t.Errorf("running slot from root=PARTLABEL=rootB: %q, %v", r, err)
	}
	if r, err := RunningSlot(cfg); err != nil || r != "B" {
		t.Errorf("RunningSlot: %q, %v", r, err)
	}

	// Partitions named otherwise: the error names what was looked for.
	cfg.LabelA, cfg.LabelB = "system0", "system1"
	_, err = check(cfg, Deps{Env: env})
	if !errors.Is(err, ErrNoSlots) || !errors.Is(err, ErrConfig) {
		t.Fatalf("labels not on the disk: %v", err)
	}
	for _, w := range []string{`abpart.slotA is not set and no partition is labelled "system0" (no ` + filepath.Join(byLabel, "system0") + ")", "abpart.slotB", "abpart.labelA"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%v\ndoes not say %q", err, w)
		}
	}
	// A slot that is set is used as it is; the other is still found.
	cfg.SlotA, cfg.LabelB = disk+"p2", ""
	if i, err = check(cfg, Deps{Env: env}); err != nil {
		t.Fatal(err)
	}
	if i.paths["A"] != disk+"p2" || i.paths["B"] != filepath.Join(byLabel, "rootB") {
		t.Errorf("slots %v", i.paths)
	}
}
