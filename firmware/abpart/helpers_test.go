package abpart

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"
	"go.uber.org/goleak"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/bootenv"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const slotSize = 1 << 20

// envBackends are the bootloader environments every scenario runs against:
// the real tools on files, plus the plain-file backend.
var envBackends = []string{"grub", "uboot", "uboot-redundant", "file"}

// device is a simulated A/B gateway: two slot files, a kernel command line,
// a boot id and a real bootloader environment. boot() plays the bootloader.
type device struct {
	t        *testing.T
	dir      string
	slots    map[string]string // name → path
	cmdline  string
	bootIDF  string
	stateDir string
	env      bootenv.Env
	reboots  *fakeRebooter
	// slotType is SlotTypeFile unless the slots are loop devices.
	slotType string
	// bootloader, when set, replaces the simulated bootloader in boot(): it
	// boots once and returns the slot it booted.
	bootloader func() string
	// wrap, when set, wraps the installer that startAgent hands to the
	// state machine (to interfere with what it does).
	wrap func(*Installer) firmware.Installer
	// tune, when set, adjusts the state machine's config in startAgent.
	tune func(*firmware.Config)
	// fallbackStyle is how the simulated bootloader falls back: "script"
	// (the shipped scripts: gw_slot=<other>, upgrade_available=0) or
	// "altbootcmd" (U-Boot's built-in bootcount: boots the other slot and
	// leaves the environment as it is).
	fallbackStyle string
}

func requireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed by this test (apt-get install grub-common libubootenv-tool u-boot-tools): %v", tool, err)
		}
	}
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// openEnv creates a bootloader environment of the given backend holding
// vars and opens it.
func openEnv(t *testing.T, backend, dir string, vars map[string]string) bootenv.Env {
	t.Helper()
	var cfg bootenv.Config
	lines := func() []byte {
		var b strings.Builder
		for _, k := range slices.Sorted(maps.Keys(vars)) {
			fmt.Fprintf(&b, "%s=%s\n", k, vars[k])
		}
		return []byte(b.String())
	}
	switch backend {
	case "grub":
		requireTools(t, "grub-editenv")
		p := filepath.Join(dir, "grubenv")
		run(t, "grub-editenv", p, "create")
		args := []string{p, "set"}
		for _, k := range slices.Sorted(maps.Keys(vars)) {
			args = append(args, k+"="+vars[k])
		}
		run(t, "grub-editenv", args...)
		cfg = bootenv.Config{Backend: "grub", GRUB: bootenv.GRUBConfig{EnvFile: p}}
	case "uboot", "uboot-redundant":
		requireTools(t, "mkenvimage", "fw_printenv", "fw_setenv")
		txt := filepath.Join(dir, "vars.txt")
		if err := os.WriteFile(txt, lines(), 0o644); err != nil {
			t.Fatal(err)
		}
		img := filepath.Join(dir, "uboot.env")
		conf := fmt.Sprintf("%s 0x0 0x4000\n", img)
		if backend == "uboot" {
			run(t, "mkenvimage", "-s", "0x4000", "-o", img, txt)
		} else {
			one := filepath.Join(dir, "one.env")
			run(t, "mkenvimage", "-r", "-s", "0x4000", "-o", one, txt)
			b, err := os.ReadFile(one)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(img, append(b, b...), 0o644); err != nil {
				t.Fatal(err)
			}
			conf += fmt.Sprintf("%s 0x4000 0x4000\n", img)
		}
		cp := filepath.Join(dir, "fw_env.config")
		if err := os.WriteFile(cp, []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
		cfg = bootenv.Config{Backend: "uboot", UBoot: bootenv.UBootConfig{ConfigFile: cp, ScriptDir: dir}}
	case "file":
		p := filepath.Join(dir, "bootenv")
		if err := os.WriteFile(p, lines(), 0o644); err != nil {
			t.Fatal(err)
		}
		cfg = bootenv.Config{Backend: "file", File: bootenv.FileConfig{Path: p}}
	default:
		t.Fatalf("unknown env backend %q", backend)
	}
	env, err := bootenv.Open(cfg, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return env
}

func openEnvFile(t testing.TB, path string) bootenv.Env {
	t.Helper()
	env, err := bootenv.Open(bootenv.Config{Backend: "file", File: bootenv.FileConfig{Path: path}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return env
}

// newDevice returns a device running slot A, committed, with random
// "firmware" in both slots.
func newDevice(t *testing.T, backend string) *device {
	t.Helper()
	dir := t.TempDir()
	d := &device{
		t: t, dir: dir,
		slots:         map[string]string{"A": filepath.Join(dir, "slotA.img"), "B": filepath.Join(dir, "slotB.img")},
		cmdline:       filepath.Join(dir, "cmdline"),
		bootIDF:       filepath.Join(dir, "boot_id"),
		stateDir:      filepath.Join(dir, "state"),
		reboots:       &fakeRebooter{},
		fallbackStyle: "script",
		slotType:      SlotTypeFile,
	}
	for _, p := range d.slots {
		if err := os.WriteFile(p, randomBytes(t, slotSize), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d.env = openEnv(t, backend, dir, map[string]string{
		"bootcmd": "run gw_boot", bootenv.VarSlot: "A", bootenv.VarUpgradeAvailable: "0", bootenv.VarBootCount: "0",
	})
	d.setRunning("A")
	return d
}

func (d *device) setRunning(slot string) {
	d.t.Helper()
	line := fmt.Sprintf("console=ttyS0,115200 root=%s rootwait ro gwagent.slot=%s\n", d.slots[slot], slot)
	if err := os.WriteFile(d.cmdline, []byte(line), 0o644); err != nil {
		d.t.Fatal(err)
	}
	if err := os.WriteFile(d.bootIDF, []byte(uuid.NewString()+"\n"), 0o644); err != nil {
		d.t.Fatal(err)
	}
}

func (d *device) config() Config {
	return Config{
		SlotA: d.slots["A"], SlotB: d.slots["B"], SlotType: d.slotType,
		CmdlinePath: d.cmdline, BootIDPath: d.bootIDF, StateDir: d.stateDir,
	}
}

// installer is a new Installer, as after an agent restart.
func (d *device) installer() *Installer {
	d.t.Helper()
	i, err := New(d.config(), Deps{Env: d.env, Rebooter: d.reboots})
	if err != nil {
		d.t.Fatal(err)
	}
	return i
}

// boot plays one power-on: the bootloader side of the A/B contract, as the
// shipped scripts implement it, then the kernel and (unless the trial slot
// fails) the agent's start. It returns the slot that ran.
func (d *device) boot() string {
	d.t.Helper()
	if d.bootloader != nil {
		slot := d.bootloader()
		d.setRunning(slot)
		return slot
	}
	ctx := context.Background()
	st, err := bootenv.ReadState(ctx, d.env)
	if err != nil {
		d.t.Fatal(err)
	}
	slot := st.Slot
	if st.UpgradeAvailable {
		count := st.BootCount + 1
		if count > st.BootLimit {
			slot = bootenv.OtherSlot(st.Slot)
			if d.fallbackStyle == "script" {
				d.set(map[string]string{bootenv.VarSlot: slot, bootenv.VarUpgradeAvailable: "0", bootenv.VarBootCount: fmt.Sprint(count)})
			} else {
				d.set(map[string]string{bootenv.VarBootCount: fmt.Sprint(count)})
			}
		} else {
			d.set(map[string]string{bootenv.VarBootCount: fmt.Sprint(count)})
		}
	}
	d.setRunning(slot)
	return slot
}

func (d *device) set(vars map[string]string) {
	d.t.Helper()
	if err := d.env.Set(context.Background(), vars); err != nil {
		d.t.Fatal(err)
	}
}

func (d *device) state() bootenv.State {
	d.t.Helper()
	st, err := bootenv.ReadState(context.Background(), d.env)
	if err != nil {
		d.t.Fatal(err)
	}
	return st
}

func (d *device) hash(slot string) string {
	d.t.Helper()
	b, err := os.ReadFile(d.slots[slot])
	if err != nil {
		d.t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// guard hashes a slot now and checks, at the end of the test, that it is
// byte-for-byte the same.
func (d *device) guard(slot string) {
	d.t.Helper()
	before := d.hash(slot)
	d.t.Cleanup(func() {
		if after := d.hash(slot); after != before {
			d.t.Errorf("slot %s (active) was modified: sha256 %s → %s", slot, before, after)
		}
	})
}

// image is a firmware image and the Update the state machine would pass.
type image struct {
	data   []byte
	sumHex string
	u      firmware.Update
}

func newImage(t *testing.T, n int) image {
	data := randomBytes(t, n)
	sum := sha256.Sum256(data)
	return image{data: data, u: firmware.Update{
		ID:      uuid.NewString(),
		Request: firmware.Request{URI: "https://127.0.0.1/fw.img", Version: "2.0.0", Size: int64(n)},
	}, sumHex: hex.EncodeToString(sum[:])}
}

// write streams the image the way the state machine does: in chunks, a
// Sync, a restart (Close and a new Open at the checkpoint), the rest.
func (d *device) write(i *Installer, img image) error {
	d.t.Helper()
	ctx := context.Background()
	half := int64(len(img.data) / 2)
	s, err := i.Open(ctx, img.u, 0)
	if err != nil {
		return err
	}
	if _, err := s.Write(img.data[:half]); err != nil {
		s.Close()
		return err
	}
	if err := s.Sync(); err != nil {
		s.Close()
		return err
	}
	if err := s.Close(); err != nil {
		return err
	}
	s, err = d.installer().Open(ctx, img.u, half)
	if err != nil {
		return err
	}
	for off := half; off < int64(len(img.data)); off += 64 << 10 {
		end := min(off+64<<10, int64(len(img.data)))
		if _, err := s.Write(img.data[off:end]); err != nil {
			s.Close()
			return err
		}
	}
	return s.Close()
}

// readBack checks ReadBack the way the state machine's verifying phase does
// and returns the Update as the state machine then passes it on.
func (d *device) readBack(i *Installer, img image) firmware.Update {
	d.t.Helper()
	u := img.u
	u.ImageSize, u.ImageSHA256 = int64(len(img.data)), img.sumHex
	st, err := i.ReadBack(context.Background(), u)
	if err != nil {
		d.t.Fatal(err)
	}
	defer st.Close()
	r, err := st.Section(0, u.ImageSize)
	if err != nil {
		d.t.Fatal(err)
	}
	got, err := io.ReadAll(r)
	if err != nil {
		d.t.Fatal(err)
	}
	if !bytes.Equal(got, img.data) {
		d.t.Fatalf("ReadBack returned %d bytes that differ from the %d-byte image", len(got), len(img.data))
	}
	return u
}

// fakeRebooter stands in for systemctl reboot: this machine must not reboot.
// The test plays the reboot with device.boot().
type fakeRebooter struct {
	mu    sync.Mutex
	calls int
	err   error
}

func (f *fakeRebooter) Reboot(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	return f.err
}

func (f *fakeRebooter) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func mustIs(t *testing.T, err, target error, what string) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s = %v, want %v", what, err, target)
	}
}
