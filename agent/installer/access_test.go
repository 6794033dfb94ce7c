package installer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/agent/config"
)

func TestNeededAccess(t *testing.T) {
	dir := t.TempDir()
	slotA, slotB := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	cmdline := filepath.Join(dir, "cmdline")
	abpart := func(set map[string]any) config.Installer {
		s := settings("abpart", map[string]any{"slotA": slotA, "slotB": slotB, "slotType": "file", "cmdlinePath": cmdline})
		for k, v := range set {
			s[k] = v
		}
		return config.Installer{Type: "abpart", Settings: s}
	}
	grub := map[string]any{"backend": "grub", "grub": map[string]any{"envFile": "/boot/grub/grubenv"}}
	labels := partlabelDir(t, map[string]string{"rootA": slotA, "rootB": slotB})
	cases := []struct {
		name       string
		cmdline    string
		in         config.Installer
		write      []string
		deny       []string
		lock, note string
	}{
		{name: "simulated touches nothing", in: config.Installer{Type: "simulated", Settings: settings("simulated", nil)}},
		{name: "running A: B and the grub environment", cmdline: "root=/dev/x gwagent.slot=A",
			in: abpart(map[string]any{"bootenv": grub}), write: []string{slotB, "/boot/grub/grubenv"}, deny: []string{slotA}},
		{name: "running B after a committed update: A", cmdline: "gwagent.slot=B",
			in: abpart(map[string]any{"bootenv": grub}), write: []string{slotA, "/boot/grub/grubenv"}, deny: []string{slotB}},
		{name: "configured running slot", cmdline: "quiet",
			in: abpart(map[string]any{"runningSlot": "B", "bootenv": grub}), write: []string{slotA, "/boot/grub/grubenv"}, deny: []string{slotB}},
		{name: "running slot unknown: neither slot", cmdline: "quiet",
			in: abpart(map[string]any{"bootenv": grub}), write: []string{"/boot/grub/grubenv"}, deny: []string{slotA, slotB}, note: "cannot tell the running slot"},
		{name: "no slots configured or labelled", cmdline: "gwagent.slot=A",
			in: abpart(map[string]any{"slotA": "", "slotB": "", "partlabelDir": dir, "bootenv": grub}), write: []string{"/boot/grub/grubenv"},
			note: `no slot granted: abpart: bad config: no slots: abpart.slotA is not set and no partition is labelled "rootA"`},
		{name: "slots by label: the inactive one", cmdline: "root=PARTLABEL=rootA",
			in:    abpart(map[string]any{"slotA": "", "slotB": "", "partlabelDir": labels, "bootenv": grub}),
			write: []string{filepath.Join(labels, "rootB"), "/boot/grub/grubenv"}, deny: []string{filepath.Join(labels, "rootA")}},
		{name: "file environment", cmdline: "gwagent.slot=A",
			in: abpart(map[string]any{"bootenv": map[string]any{"backend": "file", "file": map[string]any{"path": "/var/lib/env"}}}), write: []string{slotB, "/var/lib/env"}, deny: []string{slotA}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(cmdline, []byte(tc.cmdline+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			a, err := NeededAccess(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(a.Write, tc.write) || !slices.Equal(a.Deny, tc.deny) || a.Lock != tc.lock {
				t.Fatalf("access = write %q deny %q lock %q; want write %q deny %q lock %q", a.Write, a.Deny, a.Lock, tc.write, tc.deny, tc.lock)
			}
			if notes := strings.Join(a.Notes, "\n"); (tc.note == "") != (notes == "") || !strings.Contains(notes, tc.note) {
				t.Fatalf("notes %q, want one with %q", notes, tc.note)
			}
		})
	}

	if _, err := NeededAccess(config.Installer{Type: "nand"}); !errors.Is(err, config.ErrConfig) {
		t.Fatalf("unknown installer = %v, want a config error", err)
	}
	if _, err := NeededAccess(abpart(map[string]any{"slotC": "x"})); !errors.Is(err, config.ErrConfig) || !strings.Contains(err.Error(), "installer.abpart") {
		t.Fatalf("unknown key = %v, want a config error naming installer.abpart", err)
	}
}

// TestNeededAccessUBoot: the devices of fw_env.config are granted, except
// one that would also grant a slot: the slot itself, or the whole disk a
// slot partition is on (a raw eMMC with the environment at an offset). The
// disk and partitions are device nodes with made-up numbers and a sysfs
// tree laid out as the kernel's.
func TestNeededAccessUBoot(t *testing.T) {
	dir := t.TempDir()
	sys := filepath.Join(dir, "sys")
	disk := filepath.Join(sys, "devices", "platform", "mmc0", "block", "mmcblk0")
	nodes := map[string]struct {
		major, minor uint32
		sys          string
	}{
		"mmcblk0":      {179, 0, disk},
		"mmcblk0p2":    {179, 2, filepath.Join(disk, "mmcblk0p2")},
		"mmcblk0p3":    {179, 3, filepath.Join(disk, "mmcblk0p3")},
		"mmcblk0boot1": {179, 16, filepath.Join(sys, "devices", "platform", "mmc0", "block", "mmcblk0boot1")},
	}
	if err := os.MkdirAll(filepath.Join(sys, "dev", "block"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, n := range nodes {
		if err := os.MkdirAll(n.sys, 0o755); err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(sys, "dev", "block", fmt.Sprintf("%d:%d", n.major, n.minor))
		if err := os.Symlink(n.sys, link); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mknod(filepath.Join(dir, name), unix.S_IFBLK|0o600, int(unix.Mkdev(n.major, n.minor))); err != nil {
			t.Fatalf("mknod %s (the test needs root): %v", name, err)
		}
	}
	cmdline := filepath.Join(dir, "cmdline")
	if err := os.WriteFile(cmdline, []byte("root=/dev/mmcblk0p2 gwagent.slot=A\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	envFile := filepath.Join(dir, "uboot.env")
	fwEnv := filepath.Join(dir, "fw_env.config")
	conf := "# device offset size\n" +
		filepath.Join(dir, "mmcblk0") + " 0x3fe000 0x2000\n" +
		"\n" + filepath.Join(dir, "mmcblk0boot1") + "\t0x0 0x2000 # redundant copy\n" +
		envFile + " 0x0 0x4000\n" +
		filepath.Join(dir, "mmcblk0p3") + " 0x0 0x2000\n"
	if err := os.WriteFile(fwEnv, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	in := config.Installer{Type: "abpart", Settings: settings("abpart", map[string]any{
		"slotA": filepath.Join(dir, "mmcblk0p2"), "slotB": filepath.Join(dir, "mmcblk0p3"), "cmdlinePath": cmdline,
		"bootenv": map[string]any{"backend": "uboot", "uboot": map[string]any{"configFile": fwEnv}},
	})}
	a, err := neededAccess(in, filepath.Join(sys, "dev", "block"))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Join(dir, "mmcblk0p3"), filepath.Join(dir, "mmcblk0boot1"), envFile}
	if !slices.Equal(a.Write, want) || !slices.Equal(a.Deny, []string{filepath.Join(dir, "mmcblk0p2")}) || a.Lock != fwLock {
		t.Fatalf("access = write %q deny %q lock %q; want write %q", a.Write, a.Deny, a.Lock, want)
	}
	notes := strings.Join(a.Notes, "\n")
	if !strings.Contains(notes, "mmcblk0 not granted: it is the whole disk that holds slot") ||
		!strings.Contains(notes, "mmcblk0p3 not granted: it is slot") {
		t.Fatalf("notes %q do not say why the disk and the slot are not granted", notes)
	}

	// A missing fw_env.config grants no environment and says so.
	if err := os.Remove(fwEnv); err != nil {
		t.Fatal(err)
	}
	a, err = neededAccess(in, filepath.Join(sys, "dev", "block"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(a.Write, want[:1]) || !strings.Contains(strings.Join(a.Notes, "\n"), "fw_env.config") {
		t.Fatalf("without fw_env.config: write %q notes %q", a.Write, a.Notes)
	}
}
