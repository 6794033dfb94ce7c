package abpart

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware/bootenv"
)

// grubEmu boots the shipped GRUB snippet in grub-emu (GRUB itself, as a
// Linux program) against envFile: the file is put into an ext4 image that
// grub-emu sees as (hd0), so load_env and save_env run exactly as on a
// device, and GRUB's saved environment is copied back to envFile. Kernel
// loading does not exist in grub-emu, so the boot entry fails and the
// snippet's fallback entry "restarts": the test reads which slot GRUB tried
// to boot from its output.
type grubEmu struct {
	t       *testing.T
	dir     string
	envFile string
}

var bootingRe = regexp.MustCompile("Booting `gwagent slot ([AB])'")

func newGRUBEmu(t *testing.T, envFile string) *grubEmu {
	t.Helper()
	if testing.Short() {
		t.Skip("grub-emu boots take seconds; not in -short")
	}
	requireTools(t, "grub-emu", "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	snippet, err := filepath.Abs(filepath.Join(bootloaderDir, "grub.cfg.snippet"))
	if err != nil {
		t.Fatal(err)
	}
	// The wrapper makes (hd0) the prefix (so the snippet's plain load_env
	// and save_env use (hd0)/grubenv) and drops the on-screen delay.
	cfg := "set prefix=(hd0)\nsource (host)" + snippet + "\nset gw_fail_delay=0\n"
	if err := os.WriteFile(filepath.Join(dir, "grub.cfg"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "device.map"), []byte("(hd0) "+filepath.Join(dir, "disk.img")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return &grubEmu{t: t, dir: dir, envFile: envFile}
}

func (g *grubEmu) boot() string {
	t := g.t
	t.Helper()
	src := filepath.Join(g.dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	env, err := os.ReadFile(g.envFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "grubenv"), env, 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(g.dir, "disk.img")
	run(t, "mkfs.ext4", "-q", "-F", "-d", src, img, "4M")

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "grub-emu", "-d", g.dir, "-m", filepath.Join(g.dir, "device.map"))
	cmd.Stdin = strings.NewReader(strings.Repeat("\n", 8)) // "Press any key to continue..."
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("grub-emu: %v\n%s", err, out)
	}
	m := bootingRe.FindAllSubmatch(out, -1)
	if len(m) != 1 {
		t.Fatalf("grub-emu booted %d entries, want one:\n%q", len(m), out)
	}
	if strings.Contains(string(out), "error: sparse file") || strings.Contains(string(out), "save_env") {
		t.Fatalf("save_env failed:\n%q", out)
	}
	saved, err := exec.Command("debugfs", "-R", "cat /grubenv", img).Output()
	if err != nil {
		t.Fatalf("debugfs cat /grubenv: %v", err)
	}
	if len(saved) != 1024 || !strings.HasPrefix(string(saved), "# GRUB Environment Block") {
		t.Fatalf("GRUB left an environment block of %d bytes: %q", len(saved), saved)
	}
	if err := os.WriteFile(g.envFile, saved, 0o644); err != nil {
		t.Fatal(err)
	}
	return string(m[0][1])
}

// TestGRUBSnippet runs the installer against real GRUB executing the
// shipped snippet: a good trial is booted, counted and committed; a bad one
// is counted to bootlimit and GRUB falls back, which the installer reports
// as rolled back by bootloader.
func TestGRUBSnippet(t *testing.T) {
	ctx := t.Context()
	d := newDevice(t, "grub")
	emu := newGRUBEmu(t, filepath.Join(d.dir, "grubenv"))
	d.bootloader = emu.boot
	hashA := d.hash("A")

	// Committed: no counting, slot A.
	if got := d.boot(); got != "A" {
		t.Fatalf("committed environment booted %s", got)
	}
	if st := d.state(); st != (bootenv.State{Slot: "A", BootLimit: 3}) {
		t.Fatalf("GRUB changed a committed environment: %+v", st)
	}

	// A good update: trial boot of B, counted, then committed.
	img := newImage(t, 64<<10)
	inst, err := New(func() Config { c := d.config(); c.BootLimit = 2; return c }(), Deps{Env: d.env, Rebooter: d.reboots})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.write(inst, img); err != nil {
		t.Fatal(err)
	}
	u := d.readBack(inst, img)
	if err := inst.Apply(ctx, u); err != nil {
		t.Fatal(err)
	}
	if got := d.boot(); got != "B" {
		t.Fatalf("trial boot went to %s", got)
	}
	if st := d.state(); st != (bootenv.State{Slot: "B", UpgradeAvailable: true, BootCount: 1, BootLimit: 2}) {
		t.Fatalf("after the trial boot: %+v", st)
	}
	inst = d.installer()
	if err := inst.VerifyBoot(ctx, u); err != nil {
		t.Fatal(err)
	}
	if err := inst.Commit(ctx, u); err != nil {
		t.Fatal(err)
	}
	if got := d.boot(); got != "B" || d.state().BootCount != 0 {
		t.Fatalf("after commit GRUB booted %s with %+v", got, d.state())
	}
	if d.hash("A") != hashA {
		t.Fatal("slot A was written while it ran")
	}

	// A bad update of A (B now runs and is guarded): its trial never gets
	// to the agent, GRUB counts to bootlimit (2) and falls back to B.
	d.guard("B")
	bad := newImage(t, 32<<10)
	inst = d.installer()
	if err := d.write(inst, bad); err != nil {
		t.Fatal(err)
	}
	u = d.readBack(inst, bad)
	if err := inst.Apply(ctx, u); err != nil {
		t.Fatal(err)
	}
	for n := 1; n <= 2; n++ {
		if got := d.boot(); got != "A" {
			t.Fatalf("trial boot %d went to %s", n, got)
		}
	}
	if got := d.boot(); got != "B" {
		t.Fatalf("after bootlimit trial boots GRUB booted %s, want B", got)
	}
	if st := d.state(); st != (bootenv.State{Slot: "B", BootCount: 3, BootLimit: 2}) {
		t.Fatalf("GRUB's fallback left %+v", st)
	}
	err = d.installer().VerifyBoot(ctx, u)
	mustIs(t, err, ErrRolledBackByBootloader, "VerifyBoot after GRUB's fallback")
	if err := d.installer().Rollback(ctx, u); err != nil {
		t.Fatal(err)
	}
	if st := d.state(); st != (bootenv.State{Slot: "B", BootLimit: 2}) {
		t.Fatalf("after Rollback: %+v", st)
	}
}
