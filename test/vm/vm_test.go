package vm

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

const deviceID = "gw-vm"

// gw is the test's view of the gateway: the hub that drives it, the machine
// it runs on, and everything seen of it (twin, console, journal).
type gw struct {
	t      *testing.T
	ctx    context.Context
	start  time.Time
	dir    string // run folder, build/vm/run
	build  map[string]string
	hub    *hubProcess
	m      *machine
	twin   *stream[twinState]
	images map[string]imageFile
	report []string
	notes  []string             // the current scenario's figures, for the report
	sent   map[string]time.Time // update id -> when the device accepted it
}

type imageFile struct {
	name, version, sha256 string
	size                  int64
}

// mark is a position in everything observed, so that a check looks only at
// what happened after it.
type mark struct {
	twin, console, journal int
	at                     time.Time
}

func (g *gw) mark() mark {
	return mark{twin: g.twin.len(), console: g.m.console.len(), journal: g.m.journal.len(), at: time.Now()}
}

func (g *gw) logf(format string, args ...any) {
	g.t.Helper()
	d := time.Since(g.start).Round(time.Second)
	g.t.Logf("[%02d:%02d] %s", int(d.Minutes()), int(d.Seconds())%60, fmt.Sprintf(format, args...))
}

func TestFullSystemAB(t *testing.T) {
	if os.Getenv("GWAGENT_E2E_VM") == "" {
		t.Skip("full-system A/B test under QEMU: run it with `make e2e-vm` (GWAGENT_E2E_VM=1; root, QEMU, debootstrap)")
	}
	if os.Geteuid() != 0 {
		t.Fatal("GWAGENT_E2E_VM is set but the test is not running as root (debootstrap, chroot, mkfs need it)")
	}
	for _, tool := range []string{"qemu-system-x86_64", "debootstrap", "mkfs.ext4", "sfdisk", "grub-mkimage", "minisign", "dd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("GWAGENT_E2E_VM is set but %s is missing (make e2e-vm installs it): %v", tool, err)
		}
	}
	deb, bin := os.Getenv("GWAGENT_VM_DEB"), os.Getenv("GWAGENT_VM_BIN")
	if deb == "" || bin == "" {
		t.Fatal("GWAGENT_VM_DEB (the gwagent .deb) and GWAGENT_VM_BIN (the folder of gwhub and gwctl) must be set: run `make e2e-vm`")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	g := &gw{t: t, ctx: ctx, start: time.Now(), sent: map[string]time.Time{}}

	buildDir := os.Getenv("BUILD")
	if buildDir == "" {
		buildDir = filepath.Join(repo, "build")
	}
	g.logf("building (or reusing) the disk and images: test/vm/build.sh %s", filepath.Base(deb))
	t0 := time.Now()
	g.build = runBuild(ctx, t, g, repo, buildDir, deb)
	g.logf("disk and images ready in %s: %s", time.Since(t0).Round(time.Second), filepath.Base(g.build["disk"]))
	g.report = append(g.report, fmt.Sprintf("%-24s %7s", "build (build.sh)", time.Since(t0).Round(time.Second)))

	// The run folder: kept after the test for inspection, cleaned at the start.
	g.dir = filepath.Join(buildDir, "vm", "run")
	if err := os.RemoveAll(g.dir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(g.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	g.images = map[string]imageFile{}
	// Compressed images, except for the power cut: a compressed download
	// restarts from zero after a restart, an uncompressed one resumes.
	for _, name := range []string{"rootA-1.0.0.img", "good-2.0.0.img.zst", "unhealthy-3.0.0.img.zst", "badkernel-4.0.0.img.zst",
		"good-5.0.0.img", "good-6.0.0.img.zst", "good-7.0.0.img.zst"} {
		g.images[name] = hashImage(t, g.build["images"], name)
	}

	g.hub = startHub(ctx, t, bin, filepath.Join(g.dir, "hub"), g.build["images"])
	out, err := g.hub.gwctl(ctx, "device", "add", deviceID)
	if err != nil {
		t.Fatal(err)
	}
	deviceCS := firstLineWith(out, "HostName=")
	if !strings.Contains(deviceCS, "HostName="+hubHost+";") {
		t.Fatalf("gwctl device add printed no connection string for %s: %q", hubHost, out)
	}
	wctx, stopWatch := context.WithCancel(ctx)
	var watchers *sync.WaitGroup
	g.twin, watchers = watchTwin(wctx, g.hub.client(t), deviceID)
	defer func() { stopWatch(); watchers.Wait() }()

	// The device: a copy of the cached disk, with its own data partition.
	disk := filepath.Join(g.dir, "disk.img")
	g.must(exec.CommandContext(ctx, "cp", "--sparse=always", g.build["disk"], disk))
	g.writeData(disk, deviceCS)
	g.m = &machine{dir: g.dir, disk: disk, console: newStream[consoleLine](), journal: newStream[entry]()}
	defer func() {
		if q := g.m.cur; q != nil {
			select {
			case <-q.exited:
			default:
				q.kill()
			}
		}
		g.saveLogs()
	}()

	scenarios := []struct {
		name string
		run  func(*gw) string
	}{
		{"factory boot", (*gw).factoryBoot},
		{"healthy update", (*gw).healthyUpdate},
		{"refused images", (*gw).refusedImages},
		{"cancel", (*gw).cancelDownload},
		{"unhealthy image", (*gw).unhealthyImage},
		{"kernel cannot boot", (*gw).badKernel},
		{"power cut while writing", (*gw).powerCut},
		{"gwagent commit", (*gw).localCommit},
		{"gwagent rollback", (*gw).localRollback},
		{"power off", (*gw).powerOff},
	}
	for _, sc := range scenarios {
		m := g.mark()
		g.notes = nil
		g.logf("=== %s", sc.name)
		var final string
		ok := t.Run(strings.ReplaceAll(sc.name, " ", "_"), func(t *testing.T) {
			g.t = t
			final = sc.run(g)
		})
		g.t = t
		wall := time.Since(m.at).Round(time.Second)
		boots := g.bootsSince(m)
		g.report = append(g.report, fmt.Sprintf("%-24s %7s  %s", sc.name, wall, final))
		for _, n := range g.notes {
			g.report = append(g.report, "    "+n)
		}
		for _, b := range boots {
			g.report = append(g.report, "    "+b.String())
		}
		g.logf("--- %s: %s in %s, %d boots", map[bool]string{true: "ok", false: "FAILED"}[ok], sc.name, wall, len(boots))
		if !ok {
			g.diagnose()
			break
		}
	}
	total := time.Since(g.start).Round(time.Second)
	g.report = append(g.report, fmt.Sprintf("%-24s %7s", "total", total))
	summary := strings.Join(g.report, "\n") + "\n"
	_ = os.WriteFile(filepath.Join(g.dir, "summary.txt"), []byte(summary), 0o644)
	t.Logf("summary (also in %s):\n%s", filepath.Join(g.dir, "summary.txt"), summary)
}

// runBuild runs test/vm/build.sh, showing its progress lines, and returns its
// KEY=VALUE output.
func runBuild(ctx context.Context, t *testing.T, g *gw, repo, buildDir, deb string) map[string]string {
	cmd := exec.CommandContext(ctx, filepath.Join(repo, "test", "vm", "build.sh"), deb)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "BUILD="+buildDir)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout strings.Builder
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		g.logf("%s", sc.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("test/vm/build.sh: %v", err)
	}
	out := map[string]string{}
	for line := range strings.Lines(stdout.String()) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok {
			out[k] = v
		}
	}
	for _, k := range []string{"disk", "images", "agent_owner", "data_offset", "data_size"} {
		if out[k] == "" {
			t.Fatalf("test/vm/build.sh printed no %s:\n%s", k, stdout.String())
		}
	}
	return out
}

func hashImage(t *testing.T, dir, name string) imageFile {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, name+".minisig")); err != nil {
		t.Fatalf("image %s is not signed: %v", name, err)
	}
	base, _, _ := strings.Cut(name, ".img")
	return imageFile{name: name, version: base[strings.LastIndexByte(base, '-')+1:], sha256: hex.EncodeToString(h.Sum(nil)), size: n}
}

// writeData makes the device's data partition: the agent's (empty) state
// folder and the device's identity: its connection string, the hub's CA and
// the site's setting of where the hub is (the host's gwhub on a free port).
func (g *gw) writeData(disk, deviceCS string) {
	t := g.t
	dir := filepath.Join(g.dir, "data")
	for _, d := range []string{"gwagent", "site"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(dir, "gwagent"), 0o700); err != nil {
		t.Fatal(err)
	}
	write := func(name, content string, mode os.FileMode) {
		if err := os.WriteFile(filepath.Join(dir, "site", name), []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	write("connection-string", deviceCS+"\n", 0o600)
	ca, err := os.ReadFile(g.hub.caFile)
	if err != nil {
		t.Fatal(err)
	}
	write("hub-ca.pem", string(ca), 0o644)
	write("gwagent.env", "# Where this site's hub is: the VM test's gwhub on the host.\nGWAGENT_HUB_ADDRESS=10.0.2.2:"+g.hub.port(g.hub.mqttAddr)+"\n", 0o644)
	// The agent's user owns its state and identity (root until the package
	// brings a user of its own).
	owner := g.build["agent_owner"]
	uid, gid, _ := strings.Cut(owner, ":")
	u, err1 := strconv.Atoi(uid)
	gr, err2 := strconv.Atoi(gid)
	if err1 != nil || err2 != nil {
		t.Fatalf("build.sh: agent_owner %q is not uid:gid", owner)
	}
	for _, p := range []string{"gwagent", "site/connection-string"} {
		if err := os.Chown(filepath.Join(dir, p), u, gr); err != nil {
			t.Fatal(err)
		}
	}
	size, _ := strconv.ParseInt(g.build["data_size"], 10, 64)
	fs := filepath.Join(g.dir, "data.fs")
	g.must(exec.CommandContext(g.ctx, "mkfs.ext4", "-q", "-F", "-L", "data", "-d", dir, fs, strconv.FormatInt(size/1024, 10)+"k"))
	g.must(exec.CommandContext(g.ctx, "dd", "if="+fs, "of="+disk, "bs=1M", "seek="+g.build["data_offset"], "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"))
	_ = os.Remove(fs)
}

func (g *gw) must(cmd *exec.Cmd) {
	g.t.Helper()
	if out, err := cmd.CombinedOutput(); err != nil {
		g.t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
}

// --- waiting -------------------------------------------------------------------

// waitTwin waits until the twin (from m on) is in a state that matches, or
// fails the test with the history. Every 30 s it says what it last saw.
func (g *gw) waitTwin(m mark, what string, timeout time.Duration, match func(twinState) bool) twinState {
	g.t.Helper()
	return waitLogged(g, what, timeout, func(ctx context.Context) (twinState, error) {
		_, s, err := g.twin.wait(ctx, m.twin, match)
		return s, err
	}, func() string {
		if h := g.twin.since(0); len(h) > 0 {
			return "twin: " + h[len(h)-1].String()
		}
		return "twin: nothing yet"
	})
}

// statusOrder is the order of an update's statuses before it ends.
var statusOrder = []string{"standBy", "downloading", "verifying", "applying", "rebooting", "committing", "rollingBack"}

// rank places a status in statusOrder; every final status ranks last.
func rank(status string) int {
	if i := slices.Index(statusOrder, status); i >= 0 {
		return i
	}
	return len(statusOrder)
}

// expectStatus waits for the update to reach status. The twin is read every
// 250 ms, so a status the agent left sooner may never be seen: for a status
// on the way, a later one on the way counts as reached (the journal has every
// phase). A final status must be the one expected: any other fails at once.
func (g *gw) expectStatus(m mark, id, status string, timeout time.Duration) twinState {
	g.t.Helper()
	s := g.waitTwin(m, fmt.Sprintf("update %.8s %s", id, status), timeout, func(s twinState) bool {
		return s.fw.UpdateID == id && rank(s.fw.Status) >= rank(status)
	})
	switch {
	case s.fw.Terminal() && s.fw.Status != status:
		g.t.Fatalf("update %s ended %s while waiting for %s: %s", id, s.fw.Status, status, s)
	case s.fw.Status != status:
		g.logf("(the twin went past %s to %s between two reads)", status, s.fw.Status)
	}
	if status == "rebooting" {
		g.notes = append(g.notes, fmt.Sprintf("update %.8s: accepted → rebooting (download, verify, switch) in %s",
			id, s.at.Sub(g.sent[id]).Round(100*time.Millisecond)))
	}
	return s
}

// waitConsole waits for a console line (from m on) that matches.
func (g *gw) waitConsole(m mark, what string, timeout time.Duration, match func(consoleLine) bool) consoleLine {
	g.t.Helper()
	return waitLogged(g, what, timeout, func(ctx context.Context) (consoleLine, error) {
		_, l, err := g.m.console.wait(ctx, m.console, match)
		return l, err
	}, func() string {
		if l := g.m.console.since(max(0, g.m.console.len()-1)); len(l) > 0 {
			return "console: " + l[0].text
		}
		return "console: nothing yet"
	})
}

// waitJournal waits for a journal entry (from m on) that matches.
func (g *gw) waitJournal(m mark, what string, timeout time.Duration, match func(entry) bool) entry {
	g.t.Helper()
	return waitLogged(g, what, timeout, func(ctx context.Context) (entry, error) {
		_, e, err := g.m.journal.wait(ctx, m.journal, match)
		return e, err
	}, func() string {
		for _, e := range slices.Backward(g.m.journal.since(max(0, g.m.journal.len()-50))) {
			if e.agent() {
				return "agent: " + e.msg()
			}
		}
		return "no agent entry in the journal yet"
	})
}

func waitLogged[T any](g *gw, what string, timeout time.Duration, wait func(context.Context) (T, error), last func() string) T {
	g.t.Helper()
	ctx, cancel := context.WithTimeout(g.ctx, timeout)
	defer cancel()
	start := time.Now()
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := wait(ctx)
		done <- result{v, err}
	}()
	tick := time.NewTicker(30 * time.Second)
	defer tick.Stop()
	for {
		select {
		case r := <-done:
			if r.err != nil {
				g.t.Fatalf("no %s within %s (%s)", what, timeout, last())
			}
			g.logf("%s (after %s)", what, time.Since(start).Round(100*time.Millisecond))
			return r.v
		case <-tick.C:
			g.logf("still waiting for %s (%s of %s; %s)", what, time.Since(start).Round(time.Second), timeout, last())
		}
	}
}

// waitGuest waits until qemu-guest-agent answers in the running guest.
func (g *gw) waitGuest(timeout time.Duration) {
	g.t.Helper()
	q := g.m.cur
	waitLogged(g, "guest agent answering", timeout, func(ctx context.Context) (struct{}, error) {
		for {
			if err := q.ping(ctx); err == nil {
				return struct{}{}, nil
			}
			select {
			case <-ctx.Done():
				return struct{}{}, ctx.Err()
			case <-q.exited:
				return struct{}{}, fmt.Errorf("QEMU exited")
			case <-time.After(time.Second):
			}
		}
	}, func() string { return "qemu-guest-agent not answering" })
}

// guest runs a script in the guest and fails the test if it cannot be run
// (its exit code is the caller's to judge).
func (g *gw) guest(script string) guestResult {
	g.t.Helper()
	r, err := g.m.cur.exec(g.ctx, 90*time.Second, script)
	if err != nil {
		g.t.Fatalf("in the guest: %s: %v", script, err)
	}
	return r
}

// guestOK runs a script that must succeed and returns its output.
func (g *gw) guestOK(script string) string {
	g.t.Helper()
	r := g.guest(script)
	if r.code != 0 {
		g.t.Fatalf("in the guest: %s: exit %d\n%s%s", script, r.code, r.out, r.err)
	}
	return r.out
}

// --- what booted -----------------------------------------------------------------

type boot struct {
	run     int
	start   time.Time
	slot    string   // the slot a kernel booted (gwagent.slot=), "" if none
	grub    []string // the A/B snippet's messages
	running time.Time
}

func (b boot) String() string {
	s := fmt.Sprintf("boot (QEMU run %d): ", b.run)
	if b.slot != "" {
		s += "kernel of slot " + b.slot
		if !b.running.IsZero() {
			s += fmt.Sprintf(", gwagent running after %.1fs", b.running.Sub(b.start).Seconds())
		}
	} else {
		s += "no kernel"
	}
	if len(b.grub) > 0 {
		s += "; GRUB: " + strings.Join(b.grub, "; ")
	}
	return s
}

// grubMarker starts the first line the disk's grub.cfg prints: every boot,
// counted or not, passes there.
const grubMarker = "gw-vm: grub.cfg from"

var cmdlineSlot = regexp.MustCompile(`Command line: .*gwagent\.slot=([AB])\b`)

// bootsSince lists the machine's boots (GRUB to next GRUB) since m, with the
// slot its kernel booted and when gwagent said it runs.
func (g *gw) bootsSince(m mark) []boot {
	var boots []boot
	for _, l := range g.m.console.since(m.console) {
		switch {
		case strings.HasPrefix(l.text, grubMarker):
			boots = append(boots, boot{run: l.run, start: l.at})
		case len(boots) == 0:
		case strings.HasPrefix(l.text, "gwagent: "):
			boots[len(boots)-1].grub = append(boots[len(boots)-1].grub, strings.TrimPrefix(l.text, "gwagent: "))
		default:
			if s := cmdlineSlot.FindStringSubmatch(l.text); s != nil {
				boots[len(boots)-1].slot = s[1]
			}
		}
	}
	entries := g.m.journal.since(m.journal)
	for i := range boots {
		if boots[i].slot == "" {
			continue
		}
		for _, e := range entries {
			if e.run == boots[i].run && e.at.After(boots[i].start) && e.agent() && e.says("gwagent running") &&
				(i+1 == len(boots) || e.at.Before(boots[i+1].start)) {
				boots[i].running = e.at
				break
			}
		}
	}
	return boots
}

// waitBoot waits for the next kernel (from m on) and checks which slot it is.
func (g *gw) waitBoot(m mark, slot string, timeout time.Duration) {
	g.t.Helper()
	l := g.waitConsole(m, "a kernel booting", timeout, func(l consoleLine) bool { return cmdlineSlot.MatchString(l.text) })
	if got := cmdlineSlot.FindStringSubmatch(l.text)[1]; got != slot {
		g.t.Fatalf("GRUB booted slot %s, want %s: %s", got, slot, l.text)
	}
	g.logf("GRUB booted slot %s", slot)
}

// waitAgent waits for gwagent to run and the twin to show it connected (a new
// agent start since m).
func (g *gw) waitAgent(m mark, timeout time.Duration) twinState {
	g.t.Helper()
	g.waitJournal(m, "gwagent running", timeout, func(e entry) bool { return e.agent() && e.says("gwagent running") })
	prev := ""
	if h := g.twin.since(0); m.twin > 0 && len(h) >= m.twin {
		prev = h[m.twin-1].startedAt
	}
	return g.waitTwin(m, "the agent connected to the hub", timeout, func(s twinState) bool {
		return s.connected && s.startedAt != "" && s.startedAt != prev
	})
}

// --- checks in the guest ---------------------------------------------------------

type agentStatus struct {
	Agent struct {
		Running bool `json:"running"`
	} `json:"agent"`
	Installer        string `json:"installer"`
	RunningVersion   string `json:"runningVersion"`
	CommittedVersion string `json:"committedVersion"`
	RunningSlot      string `json:"runningSlot"`
	CommittedSlot    string `json:"committedSlot"`
	TrialSlot        string `json:"trialSlot"`
	Update           struct {
		ID    string `json:"id"`
		Phase string `json:"phase"`
	} `json:"update"`
	LastResult string `json:"lastResult"`
	Bootloader any    `json:"bootloader"`
}

// status runs `gwagent status -o json` in the guest.
func (g *gw) status() agentStatus {
	g.t.Helper()
	out := g.guestOK("gwagent status -o json")
	var s agentStatus
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		g.t.Fatalf("gwagent status -o json: %v\n%s", err, out)
	}
	return s
}

// grubenv reads the GRUB environment in the guest.
func (g *gw) grubenv() map[string]string {
	g.t.Helper()
	out := g.guestOK("grub-editenv /boot/grub/grubenv list")
	env := map[string]string{}
	for line := range strings.Lines(out) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok {
			env[k] = v
		}
	}
	return env
}

// checkSystem checks what runs in the guest: the image (its /etc/gw-image),
// the slot on the kernel command line, and GRUB's environment settled on it.
func (g *gw) checkSystem(image, slot string) {
	g.t.Helper()
	out := g.guestOK("cat /etc/gw-image; cat /proc/cmdline")
	lines := strings.SplitN(out, "\n", 2)
	if got := strings.Fields(lines[0]); len(got) == 0 || got[0] != image {
		g.t.Errorf("the guest runs image %q, want %s", lines[0], image)
	}
	if !strings.Contains(out, "gwagent.slot="+slot+" ") {
		g.t.Errorf("the guest's kernel command line does not say slot %s: %s", slot, out)
	}
	env := g.grubenv()
	if env["gw_slot"] != slot || env["upgrade_available"] == "1" {
		g.t.Errorf("grubenv is not settled on slot %s: %v", slot, env)
	}
	g.logf("guest runs %s from slot %s; grubenv %v", image, slot, env)
}

// phases lists the phases the agent logged for an update, in order, and how
// it ended ("update completed", "update rolled back", "update failed").
func (g *gw) phases(m mark, id string) []string {
	var p []string
	for _, e := range g.m.journal.since(m.journal) {
		if !e.agent() || e.get("UPDATE_ID") != id {
			continue
		}
		switch {
		case e.says("update phase"):
			p = append(p, e.get("PHASE"))
		case e.says("update completed"):
			p = append(p, "completed")
		case e.says("update failed; rolling back"):
			p = append(p, "rollingBack")
		case e.says("update rolled back"):
			p = append(p, "rolledBack")
		case e.says("update failed"):
			p = append(p, "failed")
		}
	}
	return p
}

// twinStatuses lists the statuses the twin showed for an update, in order.
func (g *gw) twinStatuses(m mark, id string) []string {
	var p []string
	for _, s := range g.twin.since(m.twin) {
		if s.fw.UpdateID == id && (len(p) == 0 || p[len(p)-1] != s.fw.Status) {
			p = append(p, s.fw.Status)
		}
	}
	return p
}

// checkSequence checks that want appears in got in order (others may come
// between).
func (g *gw) checkSequence(what string, got, want []string) {
	g.t.Helper()
	i := 0
	for _, s := range got {
		if i < len(want) && s == want[i] {
			i++
		}
	}
	if i < len(want) {
		g.t.Errorf("%s: got %v, want %v in this order", what, got, want)
		return
	}
	g.logf("%s: %s", what, strings.Join(got, " → "))
}

// update asks the device, through gwctl, to install an image from the hub's
// files, signed, with its SHA-256 and size, and returns the update id.
func (g *gw) update(name string) (string, imageFile) {
	g.t.Helper()
	return g.updateSigned(name, name+".minisig")
}

// updateSigned is update with the image's signature in the file sig.
func (g *gw) updateSigned(name, sig string) (string, imageFile) {
	g.t.Helper()
	img, ok := g.images[name]
	if !ok {
		g.t.Fatalf("no image %s", name)
	}
	files := fmt.Sprintf("https://%s:%s/files/", hubHost, g.hub.port(g.hub.httpsAddr))
	uri := files + name
	out, err := g.hub.gwctl(g.ctx, "-o", "json", "update", deviceID, "--uri", uri, "--signature-uri", files+sig,
		"--version", img.version, "--sha256", img.sha256, "--size", strconv.FormatInt(img.size, 10))
	if err != nil {
		g.t.Fatal(err)
	}
	var ans struct {
		UpdateID string `json:"updateId"`
		Status   int    `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &ans); err != nil || ans.UpdateID == "" || ans.Status != 200 {
		g.t.Fatalf("gwctl update: %v: %s", err, out)
	}
	g.sent[ans.UpdateID] = time.Now()
	g.logf("update %s: %s (%d MiB, signed) accepted", ans.UpdateID, name, img.size>>20)
	g.notes = append(g.notes, fmt.Sprintf("update %.8s: %s, %d MiB as served", ans.UpdateID, name, img.size>>20))
	return ans.UpdateID, img
}

// --- diagnostics ------------------------------------------------------------------

func (g *gw) saveLogs() {
	var b strings.Builder
	for _, s := range g.twin.since(0) {
		fmt.Fprintf(&b, "%s %s\n", s.at.Format("15:04:05.000"), s)
	}
	_ = os.WriteFile(filepath.Join(g.dir, "twin.txt"), []byte(b.String()), 0o644)
	b.Reset()
	for _, e := range g.m.journal.since(0) {
		if e.agent() || e.fields["_SYSTEMD_UNIT"] == "gw-app.service" {
			fmt.Fprintf(&b, "%s run %d boot %.8s %s: %s\n", e.at.Format("15:04:05.000"), e.run, e.boot(), e.get("SYSLOG_IDENTIFIER"), e.msg())
		}
	}
	_ = os.WriteFile(filepath.Join(g.dir, "journal-agent.txt"), []byte(b.String()), 0o644)
	b.Reset()
	for _, l := range g.m.console.since(0) {
		fmt.Fprintf(&b, "%s [%d] %s\n", l.at.Format("15:04:05.000"), l.run, l.text)
	}
	_ = os.WriteFile(filepath.Join(g.dir, "console.txt"), []byte(b.String()), 0o644)
}

func (g *gw) diagnose() {
	t := g.t
	var b strings.Builder
	h := g.twin.since(0)
	for _, s := range h[max(0, len(h)-30):] {
		fmt.Fprintf(&b, "  %s %s\n", s.at.Format("15:04:05.000"), s)
	}
	t.Logf("twin, last states:\n%s", b.String())
	b.Reset()
	c := g.m.console.since(max(0, g.m.console.len()-60))
	for _, l := range c {
		fmt.Fprintf(&b, "  %s [%d] %s\n", l.at.Format("15:04:05.0"), l.run, l.text)
	}
	t.Logf("console, last lines:\n%s", b.String())
	b.Reset()
	var agent []entry
	for _, e := range g.m.journal.since(0) {
		if e.agent() || e.fields["_SYSTEMD_UNIT"] == "gw-app.service" || e.fields["UNIT"] == "gwagent.service" {
			agent = append(agent, e)
		}
	}
	for _, e := range agent[max(0, len(agent)-60):] {
		fmt.Fprintf(&b, "  %s boot %.8s: %s\n", e.at.Format("15:04:05.0"), e.boot(), e.msg())
	}
	t.Logf("journal (gwagent, gw-app), last entries:\n%s", b.String())
	t.Logf("hub log: %s; everything else in %s", g.hub.logFile, g.dir)
}

func firstLineWith(s, prefix string) string {
	for line := range strings.Lines(s) {
		if line = strings.TrimSpace(line); strings.HasPrefix(line, prefix) {
			return line
		}
	}
	return strings.TrimSpace(s)
}
