// Command benchadaptive is the adaptive-update benchmark of `make bench`
// (test/bench/adaptive.sh): it builds realistic update pairs of ext4 root
// file system images and installs version 2 over version 1 through
// benchinstall (the real firmware.Manager and abpart, slot files), once
// adaptively (indexUri: blocks of the running slot A are reused, the rest
// fetched with Range requests) and once as a full download, in the same
// run, and prints the figures against the goals of issue 13.
//
// The pairs, all from one deterministic seed:
//
//   - version 1: an ext4 image (mkfs.ext4 -d, fixed UUID, hash seed and
//     time) of a generated tree of text, binary and partly compressible
//     files of varied sizes, filling about 60 % of the image;
//   - files-1%: a few files rewritten (about 1 % of the data, some of them
//     grown a little), the image rebuilt;
//   - upgrade-10%: about 10 % of the data replaced (sizes changed), some
//     files removed and some added, the image rebuilt;
//   - rewrite: every file rewritten, the image rebuilt;
//   - random-1%, random-10%, random-50%, random-100%: version 1 with that
//     share of its 4 KiB blocks overwritten with random bytes (100 %: an
//     image that shares nothing with version 1).
//
// Bytes on the wire are counted by benchserve (body bytes it sent: the
// index and the Range requests, or the whole image). Truly changed bytes
// are the 4 KiB blocks in which the two images differ, times 4 KiB.
//
// It owns nothing of the agent; it only drives the programs of the
// benchmark and gwctl image index.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

const blockSize = 4096

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "", "folder with benchserve, benchinstall and gwctl")
	flag.StringVar(&o.tmp, "tmp", "/var/tmp", "folder for images and slot files (on disk, not tmpfs)")
	flag.IntVar(&o.mib, "mib", 256, "image size in MiB")
	flag.IntVar(&o.reps, "reps", 3, "repetitions; figures are medians")
	flag.Uint64Var(&o.seed, "seed", 1, "seed of the generated trees and block changes")
	flag.Int64Var(&o.rate, "rate", 20_000_000, "also measure with the server sending at most this many bytes/s (0: loopback only)")
	flag.DurationVar(&o.stepTimeout, "step-timeout", 5*time.Minute, "bound of one install")
	flag.Parse()
	if o.bin == "" || o.mib < 16 || o.reps < 1 {
		fmt.Fprintln(os.Stderr, "benchadaptive: -bin is required, -mib at least 16, -reps at least 1")
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "benchadaptive:", err)
		os.Exit(1)
	}
}

type options struct {
	bin, tmp    string
	mib, reps   int
	seed        uint64
	rate        int64
	stepTimeout time.Duration
}

// pair is one update: version 1 (v1.img) to the image named name.
type pair struct {
	name, what string
	img        string // path of version 2, served as /img/<name>.img
	sha        string
	size       int64
	indexSize  int64
	changed    int64 // bytes in 4 KiB blocks that differ from version 1
	goal       string
	// plain: the device holds nothing of this image, so the adaptive
	// install is expected to choose the plain download after its sample
	// of the running slot (update.adaptiveMinReuse), and any other
	// outcome is an error.
	plain    bool
	fallback string // the reason it gave

	wire, wireFull []float64 // bytes sent by the server
	ratioLoop      []float64 // adaptive / full wall time, loopback, per pair of installs
	ratioRate      []float64 // adaptive / full wall time at -rate
	fetched        int64     // as the agent counted them (firmware.adaptive)
	reused         int64
}

func logf(format string, a ...any) { fmt.Fprintf(os.Stderr, "bench: "+format+"\n", a...) }

func run(o options) error {
	start := time.Now()
	for _, tool := range []string{"mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is needed (make deps installs e2fsprogs)", tool)
		}
	}
	tmp, err := os.MkdirTemp(o.tmp, "gwagent-adaptive.")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	srv := filepath.Join(tmp, "srv")
	if err := os.MkdirAll(srv, 0o755); err != nil {
		return err
	}
	size := int64(o.mib) << 20

	// --- images ---
	rng := rand.New(rand.NewPCG(o.seed, 0x5eed))
	v1Tree := genTree(rng, size*6/10)
	v1 := filepath.Join(tmp, "v1.img")
	logf("building version 1: %d files, %.0f MiB of data, in a %d MiB ext4 image", len(v1Tree), mibf(treeBytes(v1Tree)), o.mib)
	if err := buildImage(tmp, "v1", v1Tree, v1, size); err != nil {
		return err
	}
	pairs := []*pair{
		{name: "files-1%", what: "a few files changed (~1 % of the data)", goal: "wire/image <= 0.05"},
		{name: "upgrade-10%", what: "package upgrade (~10 %: files replaced, added, removed)"},
		{name: "rewrite", what: "everything rewritten", goal: "time <= 1.1 x full"},
		{name: "random-1%", what: "1 % of the blocks random", goal: "wire <= 1.1 x (changed+index)"},
		{name: "random-10%", what: "10 % of the blocks random", goal: "wire <= 1.1 x (changed+index)"},
		{name: "random-50%", what: "50 % of the blocks random", goal: "wire <= 1.1 x (changed+index)"},
		// The rebuilt image above still shares its free space and part of
		// its metadata with version 1; this one shares nothing.
		{name: "random-100%", what: "every block random", goal: "time <= 1.1 x full", plain: true},
	}
	for _, p := range pairs {
		p.img = filepath.Join(srv, strings.ReplaceAll(p.name, "%", "pct")+".img")
		logf("building %s: %s", p.name, p.what)
		switch p.name {
		case "files-1%":
			err = buildImage(tmp, p.name, changeFiles(rng, v1Tree, 0.01), p.img, size)
		case "upgrade-10%":
			err = buildImage(tmp, p.name, upgrade(rng, v1Tree, 0.10), p.img, size)
		case "rewrite":
			err = buildImage(tmp, p.name, rewrite(rng, v1Tree), p.img, size)
		case "random-1%":
			err = randomBlocks(rng, v1, p.img, 0.01)
		case "random-10%":
			err = randomBlocks(rng, v1, p.img, 0.10)
		case "random-50%":
			err = randomBlocks(rng, v1, p.img, 0.50)
		case "random-100%":
			err = randomBlocks(rng, v1, p.img, 1)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
		if p.sha, p.size, err = hashFile(p.img); err != nil {
			return err
		}
		if p.changed, err = changedBytes(v1, p.img); err != nil {
			return err
		}
		idx := p.img + ".bidx"
		if out, err := exec.Command(filepath.Join(o.bin, "gwctl"), "image", "index", "-o", idx, p.img).CombinedOutput(); err != nil {
			return fmt.Errorf("gwctl image index %s: %v: %s", p.name, err, out)
		}
		fi, err := os.Stat(idx)
		if err != nil {
			return err
		}
		p.indexSize = fi.Size()
	}
	logf("images built in %.0f s", time.Since(start).Seconds())

	// --- the device: slot A runs version 1 ---
	dev := filepath.Join(tmp, "dev")
	if err := os.MkdirAll(dev, 0o755); err != nil {
		return err
	}
	if err := copyFile(v1, filepath.Join(dev, "slot-a")); err != nil {
		return err
	}
	if err := truncate(filepath.Join(dev, "slot-b"), size); err != nil {
		return err
	}

	// --- loopback ---
	b := &bench{o: o, dev: dev, srv: srv}
	defer b.stopServer()
	if err := b.startServer(0); err != nil {
		return err
	}
	logf("warm-up: a full download (not counted) allocates slot B")
	if _, _, err := b.install(pairs[0], false); err != nil {
		return err
	}
	for i := range o.reps {
		for k, p := range pairs {
			logf("loopback, repetition %d/%d: %s, adaptive and full", i+1, o.reps, p.name)
			// Alternate the order, so each kind of install sees both
			// positions of the pair.
			var ta, tf float64
			if (i+k)%2 == 0 {
				if ta, err = b.adaptive(p, i == 0); err == nil {
					tf, err = b.full(p)
				}
			} else {
				if tf, err = b.full(p); err == nil {
					ta, err = b.adaptive(p, i == 0)
				}
			}
			if err != nil {
				return err
			}
			p.ratioLoop = append(p.ratioLoop, ta/tf)
		}
	}
	b.stopServer()

	// --- rate-limited link ---
	if o.rate > 0 {
		if err := b.startServer(o.rate); err != nil {
			return err
		}
		for i := range o.reps {
			// At a fixed rate a full download of any of the images costs
			// the same: one per repetition is the baseline of all pairs.
			logf("%.0f MB/s, repetition %d/%d: a full download and every adaptive install", float64(o.rate)/1e6, i+1, o.reps)
			tf, err := b.full(pairs[0])
			if err != nil {
				return err
			}
			for _, p := range pairs {
				ta, err := b.adaptive(p, false)
				if err != nil {
					return err
				}
				p.ratioRate = append(p.ratioRate, ta/tf)
			}
		}
		b.stopServer()
	}

	report(o, v1Tree, pairs, time.Since(start))
	return nil
}

// --- installs ---

type bench struct {
	o        options
	dev, srv string
	base     string
	server   *exec.Cmd
}

func (b *bench) startServer(rate int64) error {
	portFile := filepath.Join(b.dev, "port")
	os.Remove(portFile)
	cmd := exec.Command(filepath.Join(b.o.bin, "benchserve"), "-dir", b.srv, "-port-file", portFile, "-rate", strconv.FormatInt(rate, 10))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	b.server = cmd
	for range 100 {
		if p, err := os.ReadFile(portFile); err == nil && len(p) > 0 {
			b.base = "http://127.0.0.1:" + strings.TrimSpace(string(p))
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.stopServer()
	return errors.New("benchserve did not start")
}

func (b *bench) stopServer() {
	if b.server != nil {
		b.server.Process.Signal(os.Interrupt)
		b.server.Wait()
		b.server = nil
	}
}

func (b *bench) api(method, path string, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, b.base+path, nil)
	if err != nil {
		return err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode >= 300 {
		return fmt.Errorf("benchserve %s %s: %s", method, path, res.Status)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(res.Body).Decode(out)
}

type installResult struct {
	Total    float64 `json:"total_s"`
	Fetched  int64   `json:"bytes_fetched"`
	Reused   int64   `json:"bytes_reused"`
	Fallback string  `json:"fallback"`
	Error    string  `json:"error"`
}

// install installs p's image into slot B on a fresh update state and
// returns its result and the body bytes the server sent for it.
func (b *bench) install(p *pair, adaptive bool) (installResult, int64, error) {
	var res installResult
	for _, d := range []string{"firmware", "abpart"} {
		if err := os.RemoveAll(filepath.Join(b.dev, d)); err != nil {
			return res, 0, err
		}
	}
	if err := os.WriteFile(filepath.Join(b.dev, "bootenv"), []byte("gw_slot=A\nupgrade_available=0\nbootcount=0\n"), 0o644); err != nil {
		return res, 0, err
	}
	if err := b.api("POST", "/reset", nil); err != nil {
		return res, 0, err
	}
	url := b.base + "/img/" + filepath.Base(p.img)
	args := []string{"-dir", b.dev, "-url", url, "-sha256", p.sha, "-size", strconv.FormatInt(p.size, 10), "-timeout", b.o.stepTimeout.String()}
	if adaptive {
		args = append(args, "-index-url", url+".bidx")
	}
	out, err := exec.Command(filepath.Join(b.o.bin, "benchinstall"), args...).Output()
	if jerr := json.Unmarshal(bytes.TrimSpace(out), &res); jerr != nil && err == nil {
		err = jerr
	}
	kind := map[bool]string{true: "adaptive", false: "full"}[adaptive]
	if err != nil {
		return res, 0, fmt.Errorf("%s install of %s: %v: %s", kind, p.name, err, res.Error)
	}
	switch {
	case adaptive && p.plain && !strings.Contains(res.Fallback, "worth an adaptive install"):
		return res, 0, fmt.Errorf("adaptive install of %s did not choose the plain download (fallback %q)", p.name, res.Fallback)
	case adaptive && p.plain:
		p.fallback = res.Fallback
	case adaptive && res.Fallback != "":
		return res, 0, fmt.Errorf("adaptive install of %s fell back to a full download: %s", p.name, res.Fallback)
	}
	env, err := os.ReadFile(filepath.Join(b.dev, "bootenv"))
	if err != nil || !bytes.Contains(env, []byte("gw_slot=B\n")) {
		return res, 0, fmt.Errorf("%s install of %s: boot environment not switched to B: %q", kind, p.name, env)
	}
	var st struct {
		Bytes int64 `json:"bytes"`
	}
	if err := b.api("GET", "/stats", &st); err != nil {
		return res, 0, err
	}
	return res, st.Bytes, nil
}

func (b *bench) adaptive(p *pair, check bool) (float64, error) {
	res, wire, err := b.install(p, true)
	if err != nil {
		return 0, err
	}
	if b.server != nil && check {
		// The Manager checked the SHA-256 of the slot; compare it byte for
		// byte once as well.
		if n, err := changedBytes(p.img, filepath.Join(b.dev, "slot-b")); err != nil || n != 0 {
			return 0, fmt.Errorf("slot B does not hold %s after the adaptive install (%d bytes differ, %v)", p.name, n, err)
		}
	}
	p.wire = append(p.wire, float64(wire))
	p.fetched, p.reused = res.Fetched, res.Reused
	return res.Total, nil
}

func (b *bench) full(p *pair) (float64, error) {
	res, wire, err := b.install(p, false)
	if err != nil {
		return 0, err
	}
	p.wireFull = append(p.wireFull, float64(wire))
	return res.Total, nil
}

// --- report ---

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(v))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func mibf(n int64) float64 { return float64(n) / (1 << 20) }

func list(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("%.2f", x)
	}
	return strings.Join(s, " ")
}

func report(o options, tree []file, pairs []*pair, took time.Duration) {
	size := float64(int64(o.mib) << 20)
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	fmt.Fprintf(w, "\nadaptive install benchmark: %d MiB ext4 images (mkfs.ext4 -d; version 1: %d files, %.0f MiB of data, seed %d),\n",
		o.mib, len(tree), mibf(treeBytes(tree)), o.seed)
	fmt.Fprintf(w, "4 KiB index blocks, installed into slot files in %s through firmware.Manager + abpart; repetitions %d, medians\n", o.tmp, o.reps)
	fmt.Fprintf(w, "index: %d bytes = %.4f of the image\n\n", pairs[0].indexSize, float64(pairs[0].indexSize)/size)
	fmt.Fprintf(w, "%-12s %8s %9s %9s %10s %9s %9s  %s\n", "pair", "changed", "wire", "wire/", "wire/", "time/full", "time/full", "goal")
	rateHdr := "-"
	if o.rate > 0 {
		rateHdr = fmt.Sprintf("%.0fMB/s", float64(o.rate)/1e6)
	}
	fmt.Fprintf(w, "%-12s %8s %9s %9s %10s %9s %9s\n", "", "/image", "/image", "changed", "(chg+idx)", "loopback", rateHdr)
	for _, p := range pairs {
		wire := median(p.wire)
		verdict := ""
		switch p.name {
		case "files-1%":
			verdict = met(wire/size <= 0.05)
		case "rewrite", "random-100%":
			if o.rate > 0 {
				verdict = fmt.Sprintf("%s at %s, %s over loopback", met(median(p.ratioRate) <= 1.1), rateHdr, met(median(p.ratioLoop) <= 1.1))
			} else {
				verdict = met(median(p.ratioLoop) <= 1.1) + " over loopback"
			}
		default:
			if strings.HasPrefix(p.name, "random") {
				verdict = met(wire <= 1.1*float64(p.changed+p.indexSize))
			}
		}
		goal := p.goal + ": " + verdict
		if p.goal == "" {
			goal = "-"
		}
		rr := "-"
		if len(p.ratioRate) > 0 {
			rr = fmt.Sprintf("%.2f", median(p.ratioRate))
		}
		fmt.Fprintf(w, "%-12s %8.4f %9.4f %9.3f %10.3f %9.2f %9s  %s\n", p.name, float64(p.changed)/size, wire/size,
			wire/float64(p.changed), wire/float64(p.changed+p.indexSize), median(p.ratioLoop), rr, goal)
	}
	fmt.Fprintf(w, "\nper pair: wire bytes (adaptive; full download), reused as the agent reported, time ratios of each repetition\n")
	for _, p := range pairs {
		fmt.Fprintf(w, "  %-12s wire %.1f MiB (full %.1f MiB), changed %.1f MiB, reused %.1f MiB; loopback %s", p.name,
			mibf(int64(median(p.wire))), mibf(int64(median(p.wireFull))), mibf(p.changed), mibf(p.reused), list(p.ratioLoop))
		if len(p.ratioRate) > 0 {
			fmt.Fprintf(w, "; %s %s", rateHdr, list(p.ratioRate))
		}
		fmt.Fprintln(w)
		if p.fallback != "" {
			fmt.Fprintf(w, "  %-12s chose the plain download, as expected: %s\n", "", p.fallback)
		}
	}
	fmt.Fprintf(w, "(wire: body bytes benchserve sent, index included; changed: 4 KiB blocks that differ from version 1 x 4 KiB;\n")
	fmt.Fprintf(w, " time: start to reboot request of benchinstall, adaptive / full download of the same run")
	if o.rate > 0 {
		fmt.Fprintf(w, "; at %s one full download per repetition is the baseline of every pair", rateHdr)
	}
	fmt.Fprintf(w, ")\nran %.0f s\n", took.Seconds())
}

func met(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

// --- trees and images ---

type kind int

const (
	text kind = iota
	binaryData
	mixed // runs of random bytes and zeros, like executables
)

type file struct {
	path string
	size int64
	kind kind
	seed uint64
}

func treeBytes(t []file) int64 {
	var n int64
	for _, f := range t {
		n += f.size
	}
	return n
}

var dirs = []string{"usr/bin", "usr/sbin", "usr/lib", "usr/lib/gw", "usr/lib/firmware", "usr/share/doc", "usr/share/gw/ui",
	"usr/share/locale", "etc", "etc/gw", "opt/app/lib", "opt/app/assets", "var/lib/gw", "lib/modules"}

// newFile is a file of a realistic size: mostly small, some large.
func newFile(rng *rand.Rand, i int, dir string) file {
	var lo, hi float64
	switch r := rng.Float64(); {
	case r < 0.70:
		lo, hi = 512, 64<<10
	case r < 0.95:
		lo, hi = 64<<10, 1<<20
	default:
		lo, hi = 1<<20, 8<<20
	}
	size := int64(lo * math.Pow(hi/lo, rng.Float64()))
	k := kind(rng.IntN(3))
	ext := map[kind]string{text: ".txt", binaryData: ".bin", mixed: ".so"}[k]
	return file{path: fmt.Sprintf("%s/f%05d%s", dir, i, ext), size: size, kind: k, seed: rng.Uint64()}
}

func genTree(rng *rand.Rand, total int64) []file {
	var t []file
	var n int64
	for i := 0; n < total; i++ {
		f := newFile(rng, i, dirs[rng.IntN(len(dirs))])
		t = append(t, f)
		n += f.size
	}
	return t
}

// pick returns indexes of distinct random files of t summing to about
// share of its bytes.
func pick(rng *rand.Rand, t []file, share float64, skip map[int]bool) []int {
	want := int64(share * float64(treeBytes(t)))
	var got int64
	var out []int
	for _, i := range rng.Perm(len(t)) {
		if got >= want {
			break
		}
		if skip[i] || t[i].size > want-got+want/4 {
			continue
		}
		out = append(out, i)
		got += t[i].size
	}
	return out
}

func changeFiles(rng *rand.Rand, v1 []file, share float64) []file {
	t := slices.Clone(v1)
	for k, i := range pick(rng, t, share, nil) {
		t[i].seed = rng.Uint64()
		if k%2 == 0 { // every other one grows a little, as a new release's do
			t[i].size += t[i].size/20 + 100
		}
	}
	return t
}

func upgrade(rng *rand.Rand, v1 []file, share float64) []file {
	t := slices.Clone(v1)
	replaced := pick(rng, t, share*0.8, nil)
	skip := map[int]bool{}
	for _, i := range replaced {
		skip[i] = true
		t[i].seed = rng.Uint64()
		t[i].size = int64(float64(t[i].size) * (0.8 + 0.4*rng.Float64()))
	}
	removed := pick(rng, t, share*0.1, skip)
	var added int64
	want := int64(share * 0.1 * float64(treeBytes(t)))
	for i := 0; added < want; i++ {
		f := newFile(rng, 90000+i, "usr/lib/gw-new")
		t = append(t, f)
		added += f.size
	}
	slices.Sort(removed)
	for _, i := range slices.Backward(removed) {
		t = slices.Delete(t, i, i+1)
	}
	return t
}

func rewrite(rng *rand.Rand, v1 []file) []file {
	t := slices.Clone(v1)
	for i := range t {
		t[i].seed = rng.Uint64()
	}
	return t
}

var words = strings.Fields(`the gateway agent device update firmware slot image block index twin reported desired
property method hub broker session config status error retry backoff download verify apply reboot commit rollback
kernel module driver network interface address route packet socket buffer timeout service daemon journal unit
package library version release build commit tag manifest signature checksum digest header payload request response`)

// writeContent writes f's content: deterministic in (seed, kind, size).
func writeContent(w io.Writer, f file) error {
	src := rand.NewChaCha8(seed32(f.seed))
	rng := rand.New(src)
	bw := bufio.NewWriterSize(w, 256<<10)
	left := f.size
	buf := make([]byte, 4096)
	for left > 0 {
		var chunk []byte
		switch f.kind {
		case text:
			b := buf[:0]
			for len(b) < 3900 {
				b = append(b, words[rng.IntN(len(words))]...)
				if rng.IntN(12) == 0 {
					b = append(b, '\n')
				} else {
					b = append(b, ' ')
				}
			}
			chunk = b
		case binaryData:
			src.Read(buf)
			chunk = buf
		case mixed:
			src.Read(buf)
			// Zero a run in each 4 KiB, as code and data sections with
			// padding look.
			z := rng.IntN(2048)
			clear(buf[z : z+1024+rng.IntN(1024)])
			chunk = buf
		}
		if int64(len(chunk)) > left {
			chunk = chunk[:left]
		}
		if _, err := bw.Write(chunk); err != nil {
			return err
		}
		left -= int64(len(chunk))
	}
	return bw.Flush()
}

func seed32(s uint64) (out [32]byte) {
	binary.LittleEndian.PutUint64(out[:], s)
	return out
}

// The same UUID, hash seed and time for every image, so two images differ
// only where their trees do.
const (
	fsUUID   = "6a1f3b0e-2c4d-4e5f-8a9b-0c1d2e3f4a5b"
	fakeTime = "1767225600" // 2026-01-01
)

func buildImage(tmp, name string, t []file, img string, size int64) error {
	root := filepath.Join(tmp, "tree-"+name)
	defer os.RemoveAll(root)
	stamp := time.Unix(1767225600, 0)
	for _, f := range t {
		p := filepath.Join(root, f.path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		fh, err := os.Create(p)
		if err != nil {
			return err
		}
		err = writeContent(fh, f)
		if cerr := fh.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	// Fixed times on files and folders (folders last: writing a file
	// changes its folder's).
	if err := filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Chtimes(p, stamp, stamp)
	}); err != nil {
		return err
	}
	var dirsFound []string
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.IsDir() {
			dirsFound = append(dirsFound, p)
		}
		return nil
	})
	for _, d := range slices.Backward(dirsFound) {
		if err := os.Chtimes(d, stamp, stamp); err != nil {
			return err
		}
	}
	os.Remove(img)
	if err := truncate(img, size); err != nil {
		return err
	}
	cmd := exec.Command("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "rootfs", "-U", fsUUID,
		"-E", "hash_seed="+fsUUID+",root_owner=0:0", "-d", root, img)
	cmd.Env = append(os.Environ(), "E2FSPROGS_FAKE_TIME="+fakeTime)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 -d: %v: %s", err, out)
	}
	return nil
}

// randomBlocks writes dst: src with share of its 4 KiB blocks overwritten
// with random bytes.
func randomBlocks(rng *rand.Rand, src, dst string, share float64) error {
	if err := copyFile(src, dst); err != nil {
		return err
	}
	f, err := os.OpenFile(dst, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	n := int(fi.Size() / blockSize)
	buf := make([]byte, blockSize)
	for _, b := range rng.Perm(n)[:int(share*float64(n))] {
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(buf, int64(b)*blockSize); err != nil {
			return err
		}
	}
	return f.Close()
}

// changedBytes is the number of 4 KiB blocks in which a and b differ,
// times 4 KiB (a block past the end of the shorter counts as changed).
func changedBytes(a, b string) (int64, error) {
	fa, err := os.Open(a)
	if err != nil {
		return 0, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return 0, err
	}
	defer fb.Close()
	ra, rb := bufio.NewReaderSize(fa, 1<<20), bufio.NewReaderSize(fb, 1<<20)
	ba, bb := make([]byte, blockSize), make([]byte, blockSize)
	var changed int64
	for {
		na, ea := io.ReadFull(ra, ba)
		nb, eb := io.ReadFull(rb, bb)
		if na == 0 && nb == 0 {
			return changed, nil
		}
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			changed += blockSize
		}
		for _, e := range []error{ea, eb} {
			if e != nil && e != io.EOF && e != io.ErrUnexpectedEOF {
				return 0, e
			}
		}
	}
}

func hashFile(p string) (string, int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	return hex.EncodeToString(h.Sum(nil)), n, err
}

// truncate creates p, if it is missing, with size bytes (sparse).
func truncate(p string, size int64) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
