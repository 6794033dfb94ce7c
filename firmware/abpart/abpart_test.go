package abpart

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/bootenv"
)

// TestFullUpdateAndCommit: write B (with a resume), read back, switch, reboot
// into the trial, verify, commit; then a second update goes to A.
func TestFullUpdateAndCommit(t *testing.T) {
	for _, backend := range envBackends {
		t.Run(backend, func(t *testing.T) {
			ctx := t.Context()
			d := newDevice(t, backend)
			d.guard("A")
			img := newImage(t, 300<<10+7)
			inst := d.installer()

			if slot, err := inst.TargetSlot(ctx, img.u); err != nil || slot != "B" {
				t.Fatalf("TargetSlot = %q, %v; want B", slot, err)
			}
			if err := inst.Prepare(ctx, img.u); err != nil {
				t.Fatal(err)
			}
			if err := d.write(inst, img); err != nil {
				t.Fatal(err)
			}
			u := d.readBack(inst, img)
			if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
				t.Fatalf("the bootloader was switched before Apply: %+v", st)
			}
			if err := inst.Apply(ctx, u); err != nil {
				t.Fatal(err)
			}
			if st := d.state(); st != (bootenv.State{Slot: "B", UpgradeAvailable: true, BootCount: 0, BootLimit: 3}) {
				t.Fatalf("after Apply: %+v", st)
			}
			// Apply again after an agent restart: already armed, nothing changes.
			if err := d.installer().Apply(ctx, u); err != nil {
				t.Fatalf("second Apply: %v", err)
			}
			if err := inst.Reboot(ctx); err != nil || d.reboots.count() != 1 {
				t.Fatalf("Reboot = %v, %d calls", err, d.reboots.count())
			}

			if ran := d.boot(); ran != "B" {
				t.Fatalf("the bootloader booted %s, want the trial slot B", ran)
			}
			inst = d.installer()
			if err := inst.VerifyBoot(ctx, u); err != nil {
				t.Fatalf("VerifyBoot on the trial slot: %v", err)
			}
			if err := inst.Commit(ctx, u); err != nil {
				t.Fatal(err)
			}
			if st := d.state(); st != (bootenv.State{Slot: "B", BootLimit: 3}) {
				t.Fatalf("after Commit: %+v", st)
			}
			// Commit and VerifyBoot are idempotent (the agent may restart
			// between Commit and recording it).
			if err := d.installer().VerifyBoot(ctx, u); err != nil {
				t.Fatalf("VerifyBoot after commit: %v", err)
			}
			if err := d.installer().Commit(ctx, u); err != nil {
				t.Fatalf("second Commit: %v", err)
			}
			b, err := os.ReadFile(d.slots["B"])
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b[:len(img.data)], img.data) {
				t.Fatal("slot B does not hold the image")
			}
			// Later boots stay on B and no longer count.
			if ran := d.boot(); ran != "B" || d.state().BootCount != 0 {
				t.Fatalf("after commit the bootloader booted %s with %+v", ran, d.state())
			}
			st, err := d.installer().Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.Running != "B" || !st.Slots[1].Committed || st.Slots[0].Committed || st.TrialSlot != "" ||
				st.Phase != phaseCommitted || st.UpdateID != u.ID || st.Slots[0].Capacity != slotSize {
				t.Fatalf("Status = %+v", st)
			}

			// The next update targets A, now inactive; B is now the guarded one.
			next := newImage(t, 100<<10)
			if slot, err := d.installer().TargetSlot(ctx, next.u); err != nil || slot != "A" {
				t.Fatalf("next TargetSlot = %q, %v; want A", slot, err)
			}
		})
	}
}

// TestHealthFailureRollsBack: the trial slot boots but the health check
// fails; Rollback points the bootloader back and asks for a reboot; after it
// the old slot runs and Rollback completes.
func TestHealthFailureRollsBack(t *testing.T) {
	for _, backend := range envBackends {
		t.Run(backend, func(t *testing.T) {
			ctx := t.Context()
			d := newDevice(t, backend)
			d.guard("A")
			img := newImage(t, 200<<10)
			inst := d.installer()
			if err := d.write(inst, img); err != nil {
				t.Fatal(err)
			}
			u := d.readBack(inst, img)
			if err := inst.Apply(ctx, u); err != nil {
				t.Fatal(err)
			}
			d.boot()
			inst = d.installer()
			if err := inst.VerifyBoot(ctx, u); err != nil {
				t.Fatal(err)
			}
			// Health check failed: roll back.
			err := inst.Rollback(ctx, u)
			mustIs(t, err, firmware.ErrRebootPending, "Rollback on the trial slot")
			if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
				t.Fatalf("after Rollback: %+v", st)
			}
			// Called again before the reboot happened: still pending.
			mustIs(t, d.installer().Rollback(ctx, u), firmware.ErrRebootPending, "Rollback again")
			if ran := d.boot(); ran != "A" {
				t.Fatalf("booted %s after the rollback, want A", ran)
			}
			if err := d.installer().Rollback(ctx, u); err != nil {
				t.Fatalf("Rollback after the reboot: %v", err)
			}
			if st := d.state(); st != (bootenv.State{Slot: "A", BootLimit: 3}) {
				t.Fatalf("final state %+v", st)
			}
			// A committed trial is not what VerifyBoot sees now.
			mustIs(t, d.installer().VerifyBoot(ctx, u), ErrRolledBackByBootloader, "VerifyBoot after rollback")
		})
	}
}

// TestBootloaderFallback: the trial slot never comes up; the bootloader
// counts to bootlimit and falls back by itself. Both fallback styles (the
// shipped scripts, U-Boot's altbootcmd) are reported as "rolled back by
// bootloader", and Rollback then settles the environment without a reboot.
func TestBootloaderFallback(t *testing.T) {
	for _, backend := range envBackends {
		for _, style := range []string{"script", "altbootcmd"} {
			t.Run(backend+"/"+style, func(t *testing.T) {
				ctx := t.Context()
				d := newDevice(t, backend)
				d.fallbackStyle = style
				d.guard("A")
				img := newImage(t, 128<<10)
				inst := d.installer()
				if err := d.write(inst, img); err != nil {
					t.Fatal(err)
				}
				u := d.readBack(inst, img)
				if err := inst.Apply(ctx, u); err != nil {
					t.Fatal(err)
				}
				// The trial slot hangs every time: the agent never starts on it.
				for n := 1; n <= bootenv.DefaultBootLimit; n++ {
					if ran := d.boot(); ran != "B" {
						t.Fatalf("trial boot %d ran %s", n, ran)
					}
				}
				if ran := d.boot(); ran != "A" {
					t.Fatalf("after %d failed trial boots the bootloader booted %s, want A", bootenv.DefaultBootLimit, ran)
				}
				inst = d.installer()
				err := inst.VerifyBoot(ctx, u)
				mustIs(t, err, ErrRolledBackByBootloader, "VerifyBoot after the fallback")
				if !strings.Contains(err.Error(), "rolled back by bootloader") {
					t.Fatalf("error %q does not say rolled back by bootloader", err)
				}
				if err := inst.Rollback(ctx, u); err != nil {
					t.Fatalf("Rollback after the bootloader's fallback: %v", err)
				}
				if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
					t.Fatalf("after Rollback: %+v", st)
				}
				if ran := d.boot(); ran != "A" {
					t.Fatalf("booted %s, want A", ran)
				}
			})
		}
	}
}

// TestRebootDidNotHappen: after Apply the agent restarts in the same boot
// (or the bootloader does not implement the contract).
func TestRebootDidNotHappen(t *testing.T) {
	ctx := t.Context()
	d := newDevice(t, "grub")
	d.guard("A")
	img := newImage(t, 64<<10)
	inst := d.installer()
	if err := d.write(inst, img); err != nil {
		t.Fatal(err)
	}
	u := d.readBack(inst, img)
	if err := inst.Apply(ctx, u); err != nil {
		t.Fatal(err)
	}
	mustIs(t, d.installer().VerifyBoot(ctx, u), firmware.ErrRebootPending, "VerifyBoot in the same boot")

	// A reboot through a bootloader without the A/B script: slot A again,
	// nothing counted.
	d.setRunning("A")
	err := d.installer().VerifyBoot(ctx, u)
	mustIs(t, err, ErrBootloaderIgnored, "VerifyBoot after a reboot that ignored the trial")
	if !strings.Contains(err.Error(), "bootloader") {
		t.Fatalf("error %q", err)
	}
	if err := d.installer().Rollback(ctx, u); err != nil {
		t.Fatal(err)
	}
	if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
		t.Fatalf("after Rollback: %+v", st)
	}
}

// TestImageLargerThanSlot: refused by Check and Open when declared, by Write
// when not; nothing reaches the bootloader.
func TestImageLargerThanSlot(t *testing.T) {
	ctx := t.Context()
	d := newDevice(t, "uboot")
	d.guard("A")
	inst := d.installer()
	big := newImage(t, slotSize+1)

	mustIs(t, inst.Check(big.u.Request), ErrTooLarge, "Check")
	if err := inst.Check(firmware.Request{Size: slotSize}); err != nil {
		t.Fatalf("Check of an image that fits exactly: %v", err)
	}
	_, err := inst.Open(ctx, big.u, 0)
	mustIs(t, err, ErrTooLarge, "Open with a declared size too large")

	// Undeclared size (e.g. a compressed image): the sink stops at the end.
	big.u.Request.Size = 0
	s, err := inst.Open(ctx, big.u, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write(big.data[:slotSize-10]); err != nil {
		t.Fatal(err)
	}
	n, err := s.Write(big.data[slotSize-10:])
	mustIs(t, err, ErrTooLarge, "Write past the end of the slot")
	if n != 0 || !strings.Contains(err.Error(), "slot B") {
		t.Fatalf("Write = %d, %v", n, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = inst.Open(ctx, big.u, slotSize+1)
	mustIs(t, err, ErrTooLarge, "Open at an offset past the slot")
	if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
		t.Fatalf("environment changed: %+v", st)
	}
	// Apply of an image larger than the slot is refused too.
	u := big.u
	u.ImageSize, u.ImageSHA256 = int64(len(big.data)), big.sumHex
	mustIs(t, inst.Apply(ctx, u), ErrTooLarge, "Apply")
	if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
		t.Fatalf("environment changed: %+v", st)
	}
}

// TestApplyRefusesCorruptSlot: the slot no longer holds the verified bytes
// when Apply runs, so the bootloader is not switched.
func TestApplyRefusesCorruptSlot(t *testing.T) {
	ctx := t.Context()
	d := newDevice(t, "uboot-redundant")
	d.guard("A")
	img := newImage(t, 256<<10)
	inst := d.installer()
	if err := d.write(inst, img); err != nil {
		t.Fatal(err)
	}
	u := d.readBack(inst, img)
	f, err := os.OpenFile(d.slots["B"], os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{img.data[1000] ^ 1}, 1000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	err = inst.Apply(ctx, u)
	mustIs(t, err, ErrVerify, "Apply on a corrupted slot")
	if !strings.Contains(err.Error(), u.ImageSHA256) {
		t.Fatalf("error %q does not name the expected sha256", err)
	}
	if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
		t.Fatalf("bootloader switched to a corrupt slot: %+v", st)
	}
	u.ImageSHA256 = ""
	mustIs(t, inst.Apply(ctx, u), errNoImage, "Apply without a verified hash")
}

// TestApplyTrustsOnlyAFreshReadBack: Apply hashes the slot unless the state
// machine says it read this slot back and matched the hash just before, in
// the same run (Update.ReadBackVerified). The flag is what decides: with it
// set, a slot changed behind the state machine's back between its read-back
// and Apply (which nothing in the agent does) is not hashed again; without
// it, as after a restart between verifying and applying, the change is
// caught and the bootloader is not switched.
func TestApplyTrustsOnlyAFreshReadBack(t *testing.T) {
	for _, fresh := range []bool{false, true} {
		t.Run(fmt.Sprintf("readBackVerified=%t", fresh), func(t *testing.T) {
			ctx := t.Context()
			d := newDevice(t, "uboot-redundant")
			d.guard("A")
			img := newImage(t, 256<<10)
			inst := d.installer()
			if err := d.write(inst, img); err != nil {
				t.Fatal(err)
			}
			u := d.readBack(inst, img)
			u.ReadBackVerified = fresh
			f, err := os.OpenFile(d.slots["B"], os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt([]byte{img.data[7] ^ 1}, 7); err != nil {
				t.Fatal(err)
			}
			f.Close()
			err = inst.Apply(ctx, u)
			st := d.state()
			if fresh {
				if err != nil || st.Slot != "B" || !st.UpgradeAvailable {
					t.Fatalf("Apply after a fresh read-back = %v, environment %+v; want the trial armed without hashing again", err, st)
				}
				return
			}
			mustIs(t, err, ErrVerify, "Apply without a fresh read-back")
			if st.Slot != "A" || st.UpgradeAvailable {
				t.Fatalf("bootloader switched to a corrupt slot: %+v", st)
			}
		})
	}
}

// TestNeverWritesActiveSlot: situations where the inactive slot must not (or
// cannot) be determined. Both slots are guarded.
func TestNeverWritesActiveSlot(t *testing.T) {
	cases := []struct {
		name    string
		env     map[string]string // set before Open
		running string            // kernel command line
		cmdline string            // overrides running when set
		want    error
		after   bootenv.State // environment after Open
	}{
		{"running slot on trial", map[string]string{"gw_slot": "B", "upgrade_available": "1", "bootcount": "1"}, "B", "", ErrActiveSlot,
			bootenv.State{Slot: "B", UpgradeAvailable: true, BootCount: 1, BootLimit: 3}},
		{"bootloader committed to the other slot", map[string]string{"gw_slot": "B", "upgrade_available": "0"}, "A", "", ErrInconsistent,
			bootenv.State{Slot: "B", BootLimit: 3}},
		{"running slot unknown", nil, "", "console=ttyS0 root=/dev/sda9", ErrRunningSlot,
			bootenv.State{Slot: "A", BootLimit: 3}},
		{"bad slot on the command line", nil, "", "gwagent.slot=C", ErrRunningSlot,
			bootenv.State{Slot: "A", BootLimit: 3}},
		{"bad environment", map[string]string{"gw_slot": "Z"}, "A", "", bootenv.ErrContract,
			bootenv.State{}},
		{"stale trial of the target is disarmed", map[string]string{"gw_slot": "B", "upgrade_available": "1"}, "A", "", nil,
			bootenv.State{Slot: "A", BootLimit: 3}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t, "grub")
			if tc.env != nil {
				d.set(tc.env)
			}
			if tc.running != "" {
				d.setRunning(tc.running)
			}
			if tc.cmdline != "" {
				if err := os.WriteFile(d.cmdline, []byte(tc.cmdline), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if tc.want != nil {
				d.guard("A")
				d.guard("B")
			} else {
				d.guard("A")
			}
			img := newImage(t, 1000)
			inst := d.installer()
			s, err := inst.Open(t.Context(), img.u, 0)
			if s != nil {
				if _, werr := s.Write(img.data); werr != nil {
					t.Fatal(werr)
				}
				s.Close()
			}
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
			} else {
				mustIs(t, err, tc.want, "Open")
				mustIs(t, inst.Prepare(t.Context(), img.u), tc.want, "Prepare")
			}
			if tc.after != (bootenv.State{}) {
				if st := d.state(); st != tc.after {
					t.Fatalf("environment after Open: %+v, want %+v", st, tc.after)
				}
			}
		})
	}
}

func TestConfig(t *testing.T) {
	d := newDevice(t, "file")
	link := filepath.Join(d.dir, "alias.img")
	if err := os.Link(d.slots["A"], link); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		mod  func(c *Config)
		want error
		key  string
	}{
		{"no slot", func(c *Config) { c.SlotB = "" }, ErrConfig, "abpart.slotB"},
		{"same slot twice", func(c *Config) { c.SlotB = link }, ErrConfig, "abpart.slotA and abpart.slotB are the same"},
		{"bad type", func(c *Config) { c.SlotType = "nand" }, ErrConfig, "abpart.slotType"},
		{"files are not block devices", func(c *Config) { c.SlotType = "" }, ErrNotBlockDevice, "abpart.slotA"},
		{"char device", func(c *Config) { c.SlotType = SlotTypeBlock; c.SlotA = "/dev/null" }, ErrNotBlockDevice, "a character device"},
		{"missing device node", func(c *Config) { c.SlotType = SlotTypeBlock; c.SlotA = filepath.Join(d.dir, "loop7p2") }, os.ErrNotExist, "abpart.slotA"},
		{"bad running slot", func(c *Config) { c.RunningSlot = "a" }, ErrConfig, "abpart.runningSlot"},
		{"no state dir", func(c *Config) { c.StateDir = "" }, ErrConfig, "abpart.stateDir"},
		{"boot limit", func(c *Config) { c.BootLimit = 9 }, ErrConfig, "abpart.bootLimit"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := d.config()
			tc.mod(&cfg)
			_, err := New(cfg, Deps{Env: d.env})
			mustIs(t, err, tc.want, "New")
			if !strings.Contains(err.Error(), tc.key) {
				t.Fatalf("error %q does not mention %q", err, tc.key)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(d.dir, "loop7p2")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a missing device node was created")
	}
	if _, err := New(d.config(), Deps{}); !errors.Is(err, ErrConfig) {
		t.Fatalf("New without an env = %v", err)
	}
}

func TestRunningSlot(t *testing.T) {
	d := newDevice(t, "file")
	cases := []struct {
		name, cmdline string
		mod           func(c *Config)
		want          string
		err           error
	}{
		{"gwagent.slot", "root=/dev/x gwagent.slot=B quiet", nil, "B", nil},
		{"last gwagent.slot wins", "gwagent.slot=A gwagent.slot=B", nil, "B", nil},
		{"root= path", "console=ttyS0 root=" + d.slots["B"] + " rw", nil, "B", nil},
		{"root= PARTUUID", "root=PARTUUID=1234-02", func(c *Config) { c.RootA, c.RootB = "PARTUUID=1234-01", "PARTUUID=1234-02" }, "B", nil},
		{"override", "garbage", func(c *Config) { c.RunningSlot = "B" }, "B", nil},
		{"no hint", "quiet splash", nil, "", ErrRunningSlot},
		{"unknown root", "root=/dev/nvme0n1p7", nil, "", ErrRunningSlot},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(d.cmdline, []byte(tc.cmdline+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			cfg := d.config()
			if tc.mod != nil {
				tc.mod(&cfg)
			}
			i, err := New(cfg, Deps{Env: d.env})
			if err != nil {
				t.Fatal(err)
			}
			got, err := i.runningSlot()
			if got != tc.want || !errors.Is(err, tc.err) {
				t.Fatalf("runningSlot = %q, %v; want %q, %v", got, err, tc.want, tc.err)
			}
			// The start-up step that grants the inactive slot must agree
			// with the installer, from the configuration alone.
			got, err = RunningSlot(cfg)
			if got != tc.want || !errors.Is(err, tc.err) {
				t.Fatalf("RunningSlot = %q, %v; want %q, %v", got, err, tc.want, tc.err)
			}
		})
	}
}

func TestCommandRebooter(t *testing.T) {
	out := filepath.Join(t.TempDir(), "rebooted")
	r := CommandRebooter{Command: []string{"/bin/sh", "-c", "echo now > " + out}}
	if err := r.Reboot(t.Context()); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(out); err != nil || string(b) != "now\n" {
		t.Fatalf("reboot command did not run: %q, %v", b, err)
	}
	err := CommandRebooter{Command: []string{"/bin/sh", "-c", "echo 'Failed to connect to bus' >&2; exit 1"}}.Reboot(t.Context())
	if !errors.Is(err, bootenv.ErrTool) || !strings.Contains(err.Error(), "exit code 1") || !strings.Contains(err.Error(), "Failed to connect to bus") {
		t.Fatalf("failing reboot = %v", err)
	}
}

// TestTornRecord: an empty or foreign abpart.json is treated as missing.
func TestTornRecord(t *testing.T) {
	ctx := t.Context()
	d := newDevice(t, "file")
	d.guard("A")
	inst := d.installer()
	img := newImage(t, 4096)
	if err := d.write(inst, img); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d.stateDir, "abpart.json"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	u := img.u
	u.ImageSize, u.ImageSHA256 = int64(len(img.data)), img.sumHex
	mustIs(t, inst.Apply(ctx, u), ErrNoSwitch, "Apply without a record")
	_, err := inst.ReadBack(ctx, u)
	mustIs(t, err, ErrNoSwitch, "ReadBack without a record")
	if st := d.state(); st.Slot != "A" || st.UpgradeAvailable {
		t.Fatalf("environment changed: %+v", st)
	}
}

func FuzzParseCmdline(f *testing.F) {
	f.Add("BOOT_IMAGE=/boot/vmlinuz root=PARTUUID=1234-02 ro quiet gwagent.slot=B")
	f.Add("root= gwagent.slot= root=/dev/mmcblk0p3")
	f.Add("gwagent.slot=A\tgwagent.slot=B\n")
	f.Fuzz(func(t *testing.T, cmdline string) {
		slot, root := parseCmdline(cmdline)
		for _, v := range []string{slot, root} {
			if strings.ContainsAny(v, " \t\n") {
				t.Fatalf("value %q holds a blank", v)
			}
		}
		if slot != "" && !strings.Contains(cmdline, "gwagent.slot="+slot) {
			t.Fatalf("slot %q is not on the command line", slot)
		}
		if root != "" && !strings.Contains(cmdline, "root="+root) {
			t.Fatalf("root %q is not on the command line", root)
		}
	})
}
