package systemd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The two package versions: the upgrade goes from the first to the second.
const (
	version1 = "0.0.1+e2e"
	version2 = "0.0.2+e2e"
	deviceID = "e2e-gateway"
	// dpsGroup is the enrollment group of the gateway that provisions
	// itself through gwhub's DPS.
	dpsGroup = "e2e-factory"
)

// rootRunCommit is the last commit whose package ran the agent as root;
// the test also upgrades from its package (version0) to version2.
const (
	rootRunCommit = "4f9629dc6ba6fa19243317bf1ca5ef71defbb41b"
	version0      = "0.0.0+e2e.root"
)

// requiredChecks are the checks inside.sh must report: a script that stops
// early cannot pass by reporting nothing.
var requiredChecks = append([]string{
	"install", "user-created", "polkit-rule-installed", "installed-version", "enabled", "conffile", "binary-version",
	"unit-verify", "exposure-at-most-1.5",
	"unconfigured-exit-78", "unconfigured-not-restarted", "unconfigured-names-key", "unconfigured-grant-said",
	"config-edit", "start-offline", "offline-active", "offline-type-notify", "offline-status-text",
	"start", "active", "type-notify", "status-connected", "status-names-installer",
	"runs-as-gwagent", "no-capabilities", "state-handed-over", "secret-acl", "secret-no-warning", "device-cgroup-empty",
	"update-completed", "update-id", "journal-update-id", "journal-native-transport", "journal-phase-field",
	"journal-identifier", "status-after-update", "reload", "reload-same-process",
	"watchdog-restart", "watchdog-logged", "watchdog-reconnected",
	// The A/B update through the shipped unit, across a reboot of the
	// container that the agent asks logind for.
	"ab-config", "ab-accepted", "ab-rebooted", "ab-slot-written", "ab-trial-armed", "ab-reboot-by-logind",
	"ab-agent-stopped", "ab-trial-boot", "ab-completed", "ab-committed-env", "ab-status",
	"stop", "stopped-inactive", "stopped-clean", "stopped-exit-0", "state-kept", "state-private",
	"restart-before-upgrade", "upgrade", "upgraded-version", "upgraded-binary", "conffile-kept",
	"no-conffile-leftovers", "upgrade-restarted", "upgrade-active", "upgrade-runs-new-binary", "upgrade-connected",
	"upgrade-devices-slot-a",
	"remove", "removed-stopped", "removed-status", "removed-binary-gone", "removed-conffile-kept", "removed-state-kept",
	"purge", "purged-status", "purged-config-gone", "purged-state-gone", "purged-unit-links-gone", "purged-user-kept",
	// An upgrade from the version that ran the agent as root.
	"legacy-no-user", "legacy-install", "legacy-config-edit", "legacy-start", "legacy-connected", "legacy-runs-as-root",
	"legacy-update-completed", "legacy-state-root-owned",
	// The probe, run in the root-run unit, finds what the issue found there.
	"legacy-probe-finds-user", "legacy-probe-finds-systemd-run-refused", "legacy-probe-finds-poweroff-refused",
	"legacy-probe-finds-kernel-write-refused", "legacy-probe-finds-running-slot-write-refused",
	"legacy-probe-finds-running-slot-read-refused", "legacy-probe-finds-other-disk-write-refused",
	"legacy-probe-finds-shadow-read-refused", "legacy-probe-connected",
	"legacy-upgrade", "legacy-user-created",
	"legacy-upgrade-restarted", "legacy-upgrade-connected", "legacy-upgrade-runs-as-gwagent",
	"legacy-state-handed-over", "legacy-state-kept", "legacy-secret-granted", "legacy-purge",
	// A gateway with only a provisioning section: DPS, then the hub.
	"dps-install", "dps-config", "dps-registration-id", "dps-start", "dps-connected", "dps-twin-connected",
	"dps-registration-assigned", "dps-key-no-warning", "dps-assignment-private", "dps-group-key-granted", "dps-update-completed",
	"dps-provision-kept", "dps-restart-connected", "dps-purge",
}, privilegeChecks("a", "b")...)

// probeChecks are what testdata/probe.sh tries from inside the agent's unit
// (as its user, in its sandbox), each named after the outcome required.
var probeChecks = []string{
	"user", "no-capabilities", "systemd-run-refused", "poweroff-refused", "reboot-allowed",
	"kernel-present", "kernel-write-refused", "boot-create-refused", "grubenv-writable",
	"devices-present", "running-slot-write-refused", "running-slot-read-refused", "inactive-slot-writable",
	"other-disk-read-refused", "other-disk-write-refused",
	"shadow-read-refused", "secret-readable", "config-write-refused", "state-writable",
}

// privilegeChecks are the probe's checks for each run (tag a: slot A runs,
// before the A/B update; tag b: slot B runs, after it), with inside.sh's
// own checks around each run.
func privilegeChecks(tags ...string) []string {
	var out []string
	for _, tag := range tags {
		for _, c := range append([]string{"start", "no-escape", "devices", "connected"}, probeChecks...) {
			out = append(out, "priv-"+tag+"-"+c)
		}
	}
	return out
}

func TestPackageUnderSystemd(t *testing.T) {
	if os.Getenv("GWAGENT_E2E") == "" {
		t.Skip("end-to-end test under systemd-nspawn: run it with `make e2e` (GWAGENT_E2E=1; needs root, systemd-nspawn, debootstrap, lintian)")
	}
	if os.Geteuid() != 0 {
		t.Fatal("GWAGENT_E2E is set but the test is not running as root (systemd-nspawn and dpkg need it)")
	}
	for _, tool := range []string{"systemd-nspawn", "debootstrap", "dpkg-deb", "lintian", "systemd-analyze", "losetup", "git"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("GWAGENT_E2E is set but %s is missing (make deps installs it): %v", tool, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()

	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	// Under build/ (ignored) rather than a temp dir, so that a failed run can
	// be inspected; cleaned at the start of each run (a run killed midway
	// may have left the container's root mounted).
	work := filepath.Join(repo, "build", "e2e")
	_ = syscall.Unmount(filepath.Join(work, "root"), syscall.MNT_DETACH)
	if err := os.RemoveAll(work); err != nil {
		t.Fatal(err)
	}
	dirs := map[string]string{}
	for _, d := range []string{"bin", "pkg", "in", "out", "hub", "files", "slots", "root", "upper", "overlay-work"} {
		dirs[d] = filepath.Join(work, d)
		if err := os.MkdirAll(dirs[d], 0o755); err != nil {
			t.Fatal(err)
		}
	}

	t.Log("building gwhub, gwctl, the READY baseline and the two packages")
	run(ctx, t, repo, []string{"CGO_ENABLED=0"}, "go", "build", "-trimpath", "-o", dirs["bin"]+"/", "./cmd/gwhub", "./cmd/gwctl")
	// The baseline of the start-to-READY figure (see testdata/notifyready).
	run(ctx, t, repo, []string{"CGO_ENABLED=0"}, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(dirs["in"], "notifyready"), "./test/systemd/testdata/notifyready")
	pkg1 := filepath.Base(strings.TrimSpace(run(ctx, t, repo, nil, "packaging/build-deb.sh", version1, dirs["pkg"])))
	pkg2 := filepath.Base(strings.TrimSpace(run(ctx, t, repo, nil, "packaging/build-deb.sh", version2, dirs["pkg"])))
	// The root-run version, built from its own tree.
	old := filepath.Join(work, "root-run-src")
	if err := os.MkdirAll(old, 0o755); err != nil {
		t.Fatal(err)
	}
	run(ctx, t, repo, nil, "sh", "-c", `git archive "$1" | tar -x -C "$2"`, "-", rootRunCommit, old)
	pkg0 := filepath.Base(strings.TrimSpace(run(ctx, t, old, nil, "packaging/build-deb.sh", version0, dirs["pkg"])))

	t.Log("checking the package (lintian, systemd-analyze)")
	check := run(ctx, t, repo, nil, "packaging/check-deb.sh", filepath.Join(dirs["pkg"], pkg1))
	packageFigures := figuresFrom(check)

	rootfs := strings.TrimSpace(run(ctx, t, repo, nil, "test/systemd/rootfs.sh", filepath.Join("build", "rootfs")))
	rootfs = filepath.Join(repo, rootfs)

	hub := startHub(ctx, t, dirs["bin"], dirs["hub"])
	deviceCS := hub.gwctl(ctx, t, "device", "add", deviceID)
	deviceCS = firstLineWith(deviceCS, "HostName=")
	if !strings.Contains(deviceCS, "DeviceId="+deviceID) {
		t.Fatalf("gwctl device add printed no device connection string: %q", deviceCS)
	}

	// The enrollment group the DPS gateway joins, as a factory would make it.
	var group struct {
		PrimaryKey string `json:"primaryKey"`
	}
	groupOut := hub.gwctl(ctx, t, "-o", "json", "dps", "group", "add", dpsGroup)
	if err := json.Unmarshal([]byte(groupOut), &group); err != nil || group.PrimaryKey == "" {
		t.Fatalf("gwctl dps group add printed no primaryKey (%v): %q", err, groupOut)
	}
	idScope, err := os.ReadFile(filepath.Join(dirs["hub"], "dps-id-scope"))
	if err != nil {
		t.Fatal(err)
	}

	image := make([]byte, 512<<10)
	if _, err := rand.Read(image); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(image)
	images := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/firmware-2.0.0.bin" {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "firmware-2.0.0.bin", time.Time{}, bytes.NewReader(image))
	}))
	defer images.Close()

	// The A/B slots and one more disk: loop devices over files here, so the
	// slots' contents can be checked from outside after the container ran.
	slotA := newSlot(ctx, t, filepath.Join(dirs["slots"], "slotA.img"), 4<<20)
	slotB := newSlot(ctx, t, filepath.Join(dirs["slots"], "slotB.img"), 4<<20)
	other := newSlot(ctx, t, filepath.Join(dirs["slots"], "other.img"), 1<<20)

	env := map[string]string{
		"PKG0": pkg0, "PKG1": pkg1, "PKG2": pkg2, "VERSION0": version0, "VERSION1": version1, "VERSION2": version2,
		"SLOT_A": slotA.dev, "SLOT_A_NUM": slotA.num,
		"SLOT_B": slotB.dev, "SLOT_B_NUM": slotB.num,
		"OTHER_DISK": other.dev, "OTHER_DISK_NUM": other.num,
		"DEVICE_ID":                 deviceID,
		"DEVICE_CONNECTION_STRING":  deviceCS,
		"SERVICE_CONNECTION_STRING": hub.serviceCS,
		"MQTT_ADDR":                 hub.mqttAddr,
		"HTTPS_ENDPOINT":            "https://" + hub.httpsAddr,
		"IMAGE_URL":                 images.URL + "/firmware-2.0.0.bin",
		"IMAGE_VERSION":             "2.0.0",
		"IMAGE_SHA256":              hex.EncodeToString(sum[:]),
		"IMAGE_SIZE":                strconv.Itoa(len(image)),
		"DPS_ID_SCOPE":              strings.TrimSpace(string(idScope)),
		"DPS_GROUP_ID":              dpsGroup,
		"DPS_GROUP_KEY":             group.PrimaryKey,
		"DPS_CONNECTION_STRING":     hub.dpsCS,
	}
	writeEnv(t, filepath.Join(dirs["in"], "env"), env)
	copyFile(t, filepath.Join(dirs["bin"], "gwctl"), filepath.Join(dirs["in"], "gwctl"), 0o755)
	copyFile(t, hub.caFile, filepath.Join(dirs["in"], "ca.pem"), 0o644)

	t.Log("booting the container")
	start := time.Now()
	console, boots := bootContainer(ctx, t, rootfs, dirs, filepath.Join(repo, "test", "systemd", "testdata"))
	t.Logf("container ran for %s, %d boot(s)", time.Since(start).Round(time.Second), boots)

	// From outside: the running slot A was never written, slot B holds the
	// image, the other disk is untouched.
	if !slotA.unchanged(t) {
		t.Error("slot A (the running slot during the update) was written")
	}
	if !other.unchanged(t) {
		t.Error("the other disk was written")
	}
	if b := slotB.read(t); len(b) < len(image) || !bytes.Equal(b[:len(image)], image) {
		t.Error("slot B does not hold the image after the A/B update")
	}

	results, err := os.ReadFile(filepath.Join(dirs["out"], "results"))
	failed := false
	if err != nil {
		t.Errorf("the checks inside the container wrote no results: %v", err)
		failed = true
	}
	passed := map[string]bool{}
	done := false
	for line := range strings.Lines(string(results)) {
		line = strings.TrimSpace(line)
		switch {
		case line == "done":
			done = true
		case strings.HasPrefix(line, "ok "):
			passed[strings.TrimPrefix(line, "ok ")] = true
		case strings.HasPrefix(line, "FAIL "):
			t.Error(line)
			failed = true
		}
	}
	for _, name := range requiredChecks {
		if !passed[name] {
			t.Errorf("check %q did not pass", name)
			failed = true
		}
	}
	if !done {
		t.Error("the checks inside the container did not run to the end")
		failed = true
	}
	if failed {
		dumpTail(t, "container trace (out/log)", filepath.Join(dirs["out"], "log"), 200)
		dumpTail(t, "boot loader (out/bootloader.log)", filepath.Join(dirs["out"], "bootloader.log"), 20)
		dumpTail(t, "container journal", filepath.Join(dirs["out"], "journal.txt"), 300)
		dumpTail(t, "hub log", hub.logFile, 60)
		t.Logf("container console:\n%s", lastLines(console, 60))
	}

	figures := figuresFrom(readOr(filepath.Join(dirs["out"], "figures")))
	var b strings.Builder
	for _, k := range []string{"deb_file", "deb_size_kib", "installed_size_kib", "exposure"} {
		fmt.Fprintf(&b, "%s=%s\n", k, packageFigures[k])
	}
	fmt.Fprintf(&b, "container_boots=%d\n", boots)
	for _, k := range slices.Sorted(maps.Keys(figures)) {
		fmt.Fprintf(&b, "%s=%s\n", k, figures[k])
	}
	if err := os.WriteFile(filepath.Join(work, "figures.txt"), []byte(b.String()), 0o644); err != nil {
		t.Error(err)
	}
	t.Logf("figures (also in %s):\n%s", filepath.Join(work, "figures.txt"), b.String())
}

// run runs a command in dir and returns its stdout; any failure is fatal and
// shows stderr.
func run(ctx context.Context, t *testing.T, dir string, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), err, lastLines(stdout.String(), 40), lastLines(stderr.String(), 40))
	}
	return stdout.String()
}

type hubProcess struct {
	mqttAddr, httpsAddr string
	caFile              string
	serviceCS           string
	dpsCS               string
	logFile             string
	bin                 string
}

// startHub starts gwhub on free loopback ports (the container shares the
// host's loopback) and waits until it serves.
func startHub(ctx context.Context, t *testing.T, bin, stateDir string) *hubProcess {
	t.Helper()
	h := &hubProcess{mqttAddr: freeAddr(t), httpsAddr: freeAddr(t), bin: bin, logFile: stateDir + ".log"}
	logf, err := os.Create(h.logFile)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(bin, "gwhub"), "run", "--state-dir", stateDir,
		"--mqtt-addr", h.mqttAddr, "--https-addr", h.httpsAddr, "--hostname", "localhost", "--log-format", "json")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})

	h.caFile = filepath.Join(stateDir, "ca.pem")
	csFile := filepath.Join(stateDir, "service-connection-string")
	dpsFile := filepath.Join(stateDir, "dps-connection-string")
	deadline := time.Now().Add(30 * time.Second)
	for {
		cs, csErr := os.ReadFile(csFile)
		dpsCS, dpsErr := os.ReadFile(dpsFile)
		_, caErr := os.Stat(h.caFile)
		if csErr == nil && dpsErr == nil && caErr == nil && len(cs) > 0 && len(dpsCS) > 0 && dialable(h.mqttAddr) && dialable(h.httpsAddr) {
			h.serviceCS = strings.TrimSpace(string(cs))
			h.dpsCS = strings.TrimSpace(string(dpsCS))
			return h
		}
		select {
		case err := <-exited:
			t.Fatalf("gwhub exited: %v\n%s", err, readOr(h.logFile))
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("gwhub not serving after 30s\n%s", readOr(h.logFile))
		}
	}
}

func (h *hubProcess) gwctl(ctx context.Context, t *testing.T, args ...string) string {
	t.Helper()
	args = append([]string{"--endpoint", "https://" + h.httpsAddr}, args...)
	return run(ctx, t, ".", []string{"IOTHUB_CONNECTION_STRING=" + h.serviceCS, "IOTHUB_DPS_CONNECTION_STRING=" + h.dpsCS, "GWCTL_CA_FILE=" + h.caFile},
		filepath.Join(h.bin, "gwctl"), args...)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func dialable(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// maxBoots bounds the boots of one run: the first, and the one after the
// reboot the A/B update asks for.
const maxBoots = 3

// bootContainer boots the root file system with the test units until it
// powers off, booting it again when it reboots (as systemd-nspawn@.service
// does), and returns the console output and the number of boots. The root is
// an overlay on the cached rootfs, kept across the reboots.
func bootContainer(ctx context.Context, t *testing.T, rootfs string, dirs map[string]string, testdata string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Minute)
	defer cancel()
	root := dirs["root"]
	if err := syscall.Mount("overlay", root, "overlay", 0,
		"lowerdir="+rootfs+",upperdir="+dirs["upper"]+",workdir="+dirs["overlay-work"]); err != nil {
		t.Fatalf("mount the container's root (overlay on %s): %v", rootfs, err)
	}
	defer func() {
		if err := syscall.Unmount(root, 0); err != nil {
			t.Errorf("unmount %s: %v", root, err)
		}
	}()
	var out bytes.Buffer
	boots := 0
	for boots < maxBoots {
		boots++
		fmt.Fprintf(&out, "--- boot %d\n", boots)
		cmd := exec.CommandContext(ctx, "systemd-nspawn", "-D", root, "-b",
			"--register=no", "--keep-unit", "--console=pipe",
			"--bind-ro="+dirs["pkg"]+":/mnt/pkg",
			"--bind-ro="+dirs["in"]+":/mnt/in",
			"--bind="+dirs["out"]+":/mnt/out",
			"--bind-ro="+testdata+":/mnt/test",
			"--bind-ro="+filepath.Join(testdata, "gwagent-e2e.service")+":/etc/systemd/system/gwagent-e2e.service",
			"--bind-ro="+filepath.Join(testdata, "gwagent-e2e-boot.service")+":/etc/systemd/system/gwagent-e2e-boot.service",
			// Arguments after the options go to the container's systemd, which
			// reads them as its kernel command line.
			"systemd.wants=gwagent-e2e-boot.service", "systemd.wants=gwagent-e2e.service")
		// SIGTERM asks nspawn to shut the container down cleanly.
		cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
		cmd.WaitDelay = 30 * time.Second
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		var exit *exec.ExitError
		switch {
		case ctx.Err() != nil:
			t.Errorf("the container did not power off within 20 minutes")
			return out.String(), boots
		case errors.As(err, &exit) && exit.ExitCode() == 133:
			// systemd-nspawn's exit status when the container rebooted.
			continue
		case err != nil:
			t.Errorf("systemd-nspawn: %v", err)
		}
		return out.String(), boots
	}
	t.Errorf("the container rebooted %d times; the test reboots it once", boots)
	return out.String(), boots
}

// slot is a loop device over a file of random bytes.
type slot struct {
	file, dev, num string
	sum            [32]byte
}

// newSlot makes file (size bytes of random data) and attaches a loop device
// to it, detached at the end of the test.
func newSlot(ctx context.Context, t *testing.T, file string, size int) *slot {
	t.Helper()
	b := make([]byte, size)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, "losetup", "-f", "--show", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup -f --show %s (only loop0-7 exist here; are they all taken?): %v: %s", file, err, out)
	}
	s := &slot{file: file, dev: strings.TrimSpace(string(out)), sum: sha256.Sum256(b)}
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", s.dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", s.dev, err, out)
		}
	})
	var st syscall.Stat_t
	if err := syscall.Stat(s.dev, &st); err != nil {
		t.Fatal(err)
	}
	s.num = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	return s
}

func (s *slot) read(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(s.file)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (s *slot) unchanged(t *testing.T) bool { return sha256.Sum256(s.read(t)) == s.sum }

func writeEnv(t *testing.T, path string, env map[string]string) {
	t.Helper()
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(env)) {
		// Single quotes: nothing in the value is expanded by the shell.
		fmt.Fprintf(&b, "%s='%s'\n", k, strings.ReplaceAll(env[k], "'", `'\''`))
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, mode); err != nil {
		t.Fatal(err)
	}
}

func figuresFrom(s string) map[string]string {
	m := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && !strings.ContainsAny(k, " \t") {
			m[k] = v
		}
	}
	return m
}

func firstLineWith(s, prefix string) string {
	for line := range strings.Lines(s) {
		if line = strings.TrimSpace(line); strings.HasPrefix(line, prefix) {
			return line
		}
	}
	return strings.TrimSpace(s)
}

func readOr(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return ""
		}
		return err.Error()
	}
	return string(b)
}

func dumpTail(t *testing.T, what, path string, n int) {
	t.Helper()
	t.Logf("--- %s (%s, last %d lines):\n%s", what, path, n, lastLines(readOr(path), n))
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
