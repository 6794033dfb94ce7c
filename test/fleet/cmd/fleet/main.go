// Command fleet runs a fleet of real gwagent processes on one gwhub
// (package test/fleet) for `make fleet-demo` and `make bench`:
//
//	fleet demo  -bin build [-devices 20 -offline 3 -bad 2]
//	fleet bench -bin build [-reps 10] [-devices 1000 -via gwctl|desired -rates 0,80 -waves 1,1%,10%,50%,100%] [-hub-args ...]
//
// It needs gwhub, gwagent and gwctl in -bin (make build).
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/test/fleet"
)

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "demo" && os.Args[1] != "bench") {
		fmt.Fprintln(os.Stderr, "usage: fleet demo|bench -bin DIR [flags]")
		os.Exit(64)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	if os.Args[1] == "demo" {
		err = demo(ctx, os.Args[2:])
	} else {
		err = bench(ctx, os.Args[2:])
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		stop()
		os.Exit(1)
	}
}

type common struct {
	bin, dir string
	keep     bool
}

func (c *common) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.bin, "bin", "build", "folder with gwhub, gwagent and gwctl (make build)")
	fs.BoolVar(&c.keep, "keep", false, "keep the work folder (logs, state)")
}

func (c *common) workDir(prefix string) (func(failed bool), error) {
	abs, err := filepath.Abs(c.bin)
	if err != nil {
		return nil, err
	}
	c.bin = abs
	for _, b := range []string{"gwhub", "gwagent", "gwctl"} {
		if _, err := os.Stat(filepath.Join(c.bin, b)); err != nil {
			return nil, fmt.Errorf("%s/%s is missing: run make build first", c.bin, b)
		}
	}
	if c.dir, err = os.MkdirTemp("", prefix); err != nil {
		return nil, err
	}
	return func(failed bool) {
		if c.keep || failed {
			fmt.Printf("files kept in %s\n", c.dir)
			return
		}
		_ = os.RemoveAll(c.dir)
	}, nil
}

func step(format string, args ...any) { fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", args...) }

func logf(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }

// pick spreads k indexes over n, away from the first devices (the first
// waves), so a demo shows waves advancing before the failures come.
func pick(n, k, offset int) []int {
	var out []int
	for i := range k {
		out = append(out, (offset+(i+1)*n/(k+1))%n)
	}
	return out
}

func demo(ctx context.Context, args []string) (err error) {
	var c common
	fs := flag.NewFlagSet("demo", flag.ExitOnError)
	c.flags(fs)
	n := fs.Int("devices", 20, "gateways")
	offline := fs.Int("offline", 3, "gateways held offline until the rollout reached them")
	bad := fs.Int("bad", 2, "gateways whose trusted key does not match the image's signature")
	_ = fs.Parse(args)
	cleanup, err := c.workDir("gwagent-fleet-demo.")
	if err != nil {
		return err
	}
	defer func() { cleanup(err != nil) }()

	step("Starting gwhub and %d gateways (%d offline, %d trusting another signing key)", *n, *offline, *bad)
	devs := fleet.Plan(*n, pick(*n, *bad, 1), pick(*n, *offline, 2))
	f, err := fleet.Start(ctx, fleet.Options{Bin: c.bin, Dir: c.dir, Devices: devs, Logf: logf,
		Stages: fleet.Stages{WaitBeforeDownload: time.Second, Download: 3 * time.Second, Apply: 2 * time.Second}})
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	var ids, off []string
	for _, d := range devs {
		ids = append(ids, d.ID)
		mark := ""
		if d.Bad {
			mark += " bad"
		}
		if d.Offline {
			mark += " offline"
			off = append(off, d.ID)
		}
		if mark != "" {
			logf("%s (site %s, ring %s):%s", d.ID, d.Site, d.Ring, mark)
		}
	}
	fmt.Println("    gwctl reaches the hub with:")
	for _, e := range f.Env {
		k, v, _ := strings.Cut(e, "=")
		if k == "IOTHUB_CONNECTION_STRING" {
			v = "\"$(cat " + filepath.Join(c.dir, "hub", "service-connection-string") + ")\""
		}
		fmt.Printf("      export %s=%s\n", k, v)
	}

	const name = "demo-2-0"
	img := f.Image
	rargs := []string{"rollout", "start", name, "--uri", img.URI, "--version", img.Version, "--sha256", img.SHA256,
		"--size", fmt.Sprint(img.Size), "--signature-uri", img.SignatureURI, "--devices", strings.Join(ids, ","),
		"--waves", "1,25%,100%", "--success", "80%", "--max-failures", "20%", "--rate", "20", "--watch"}
	step("gwctl rollout start %s … --waves 1,25%%,100%% --success 80%% --max-failures 20%% --watch", name)
	watch := f.GwctlCmd(ctx, rargs...)
	watch.Stdout, watch.Stderr = os.Stdout, os.Stderr
	if err := watch.Start(); err != nil {
		return err
	}
	watched := make(chan error, 1)
	go func() { watched <- watch.Wait() }()

	// Once every online gateway has ended its update, the offline ones
	// come online and converge.
	online := func(m map[string]fleet.State) bool {
		for _, d := range devs {
			if s := m[d.ID]; !d.Offline && !(s.DesiredID != "" && s.Ended(s.DesiredID)) {
				return false
			}
		}
		return true
	}
	for waited := false; !waited; {
		select {
		case err := <-watched:
			return fmt.Errorf("the rollout ended before the offline gateways came online: %v", err)
		case <-time.After(time.Second):
		}
		s, err := f.States(ctx)
		waited = err == nil && online(s)
	}
	step("Every online gateway has ended its update: starting the %d offline ones (%s)", len(off), strings.Join(off, ", "))
	if err := f.StartAgents(ctx, off...); err != nil {
		return err
	}
	if err := <-watched; err != nil {
		return fmt.Errorf("gwctl rollout start --watch: %w", err)
	}
	step("gwctl rollout status %s", name)
	out, errOut, _, err := f.Gwctl(ctx, "rollout", "status", name)
	fmt.Print(out, errOut)
	if err != nil {
		return err
	}
	step("Stopping the gateways and gwhub")
	return nil
}

func bench(ctx context.Context, args []string) (err error) {
	var c common
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	c.flags(fs)
	reps := fs.Int("reps", 10, "offline-reconnect repetitions (each plain and with an update); 0 skips")
	n := fs.Int("devices", 1000, "gateways of the rollout (fewer when memory does not hold them); 0 skips")
	via := fs.String("via", string(fleet.ViaGwctl), "rollout driver: gwctl (gwctl rollout start --watch) or desired (the harness writes desired firmware itself, paced)")
	rates := fs.String("rates", "0,80", "one rollout after the other on the same fleet, one per --rate given to gwctl (comma-separated twin writes/s; 0: gwctl's default)")
	waves := fs.String("waves", "1,1%,10%,50%,100%", "gwctl rollout --waves")
	hubArgs := fs.String("hub-args", "", "more gwhub run flags, blank-separated (e.g. --twin-write-rate 100)")
	memShare := fs.Float64("mem-share", 0.5, "share of MemAvailable the agents may take")
	_ = fs.Parse(args)
	var rs []float64
	for r := range strings.SplitSeq(*rates, ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(r), 64)
		if err != nil || v < 0 {
			return fmt.Errorf("-rates: bad rate %q", r)
		}
		rs = append(rs, v)
	}
	if v := fleet.Via(*via); v != fleet.ViaGwctl && v != fleet.ViaDesired {
		return fmt.Errorf("-via: gwctl or desired, not %q", *via)
	}
	cleanup, err := c.workDir("gwagent-fleet-bench.")
	if err != nil {
		return err
	}
	defer func() { cleanup(err != nil) }()
	if *reps > 0 {
		if err := benchReconnect(ctx, c, *reps); err != nil {
			return err
		}
	}
	if *n > 0 && len(rs) > 0 {
		return benchRollout(ctx, c, rolloutBench{n: *n, via: fleet.Via(*via), rates: rs, waves: strings.Split(*waves, ","),
			hubArgs: strings.Fields(*hubArgs), memShare: *memShare})
	}
	return nil
}

func benchReconnect(ctx context.Context, c common, reps int) error {
	f, err := fleet.Start(ctx, fleet.Options{Bin: c.bin, Dir: filepath.Join(c.dir, "reconnect"), Devices: fleet.Plan(1, nil, nil),
		Stages: fleet.Stages{Download: 200 * time.Millisecond, Apply: 200 * time.Millisecond}})
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	r, err := fleet.BenchReconnect(ctx, f, "gw-001", reps)
	if err != nil {
		return err
	}
	conn, plain, started := fleet.Median(r.Connected), fleet.Median(r.Plain), fleet.Median(r.Started)
	goal := "met"
	if ratio(started, plain) > 1.5 {
		goal = "NOT met"
	}
	fmt.Printf("\n  fleet 1. an offline gateway reconnecting, %d times each way, interleaved; from the agent's exec\n", reps)
	fmt.Printf("     to what the hub stores (service API polled every 5 ms); medians of %d repetitions:\n", reps)
	fmt.Printf("     plain reconnect (desired firmware it already runs, written while offline): ac 200 stored %s (baseline)\n", ms(plain))
	fmt.Printf("     desired update written while offline: its ac 202 (update started) stored %s\n", ms(started))
	fmt.Printf("     ratio %.2f (goal <= 1.5: %s), +%s; connected (both): %s\n", ratio(started, plain), goal, ms(started-plain), ms(conn))
	fmt.Printf("     (all, ms: plain %v; update %v; connected %v)\n", msList(r.Plain), msList(r.Started), msList(r.Connected))
	return nil
}

type rolloutBench struct {
	n        int
	via      fleet.Via
	rates    []float64 // 0: gwctl's default
	waves    []string
	hubArgs  []string
	memShare float64
}

func benchRollout(ctx context.Context, c common, b rolloutBench) error {
	// Every device is registered; agents start in batches below.
	all := make([]int, b.n)
	for i := range all {
		all[i] = i
	}
	devs := fleet.Plan(b.n, nil, all)
	f, err := fleet.Start(ctx, fleet.Options{Bin: c.bin, Dir: filepath.Join(c.dir, "rollout"), Devices: devs, HubArgs: b.hubArgs,
		Stages: fleet.Stages{Download: 2 * time.Second, Apply: 2 * time.Second}, StartConcurrency: 32, ImageSize: 64 << 10})
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	defRate := 0.0
	if b.via == fleet.ViaGwctl {
		// gwctl must have the command; its help gives its default rate.
		out, errOut, code, err := f.Gwctl(ctx, "rollout", "start", "--help")
		if err != nil || code != 0 {
			return fmt.Errorf("gwctl has no rollout start (exit %d, %v): %s%s", code, err, out, errOut)
		}
		if m := regexp.MustCompile(`--rate float[^\n]*\(default ([0-9.]+)\)`).FindStringSubmatch(out); m != nil {
			defRate, _ = strconv.ParseFloat(m[1], 64)
		}
	}
	ids := make([]string, b.n)
	for i, d := range devs {
		ids[i] = d.ID
	}
	probe := min(b.n, 10)
	if err := f.StartAgents(ctx, ids[:probe]...); err != nil {
		return err
	}
	if err := sleepCtx(ctx, 5*time.Second); err != nil {
		return err
	}
	per, anon := medianRSS(f, ids[:probe]), medianAnon(f, ids[:probe])
	avail, err := fleet.MemAvailable()
	if err != nil {
		return err
	}
	// Each more agent costs its own pages (RssAnon): the program's text
	// in VmRSS is shared by all of them.
	held := b.n
	if anon > 0 {
		held = min(b.n, probe+int(float64(avail)*b.memShare/float64(anon)))
	}
	fmt.Fprintf(os.Stderr, "fleet bench: agent VmRSS %d KiB (own pages %d KiB), MemAvailable %d KiB: starting %d of %d agents\n", per, anon, avail, held, b.n)
	t0 := time.Now()
	if err := f.StartAgents(ctx, ids[probe:held]...); err != nil {
		return err
	}
	startAll := time.Since(t0)
	availHeld, _ := fleet.MemAvailable()
	ids = ids[:held]
	// Baseline: the fleet idle, connected.
	if err := sleepCtx(ctx, 10*time.Second); err != nil {
		return err
	}
	idleCPU0, _ := fleet.ReadCPU(f.Hub.PID())
	if err := sleepCtx(ctx, 10*time.Second); err != nil {
		return err
	}
	idleCPU1, _ := fleet.ReadCPU(f.Hub.PID())
	idleHub, _ := fleet.ReadMem(f.Hub.PID())
	idleAgent := medianRSS(f, ids)
	idleRate := (idleCPU1 - idleCPU0).Seconds() / 10
	limit := 0.0
	if w, err := f.TwinWrites(); err == nil {
		limit = w.Limit
	}

	fmt.Printf("\n  fleet 2. rollouts through %s to the same fleet of real gwagent processes\n", b.via)
	fmt.Printf("     gateways held: %d real gwagent processes (asked for %d; the bench starts as many as %.0f%% of\n", held, b.n, 100*b.memShare)
	fmt.Printf("     MemAvailable holds at %s of own pages (RssAnon) each, VmRSS %s; MemAvailable %s before, %s with\n",
		mib(anon), mib(per), mib(avail), mib(availHeld))
	fmt.Printf("     the fleet); %d started and connected in %s\n", held-probe, startAll.Round(time.Millisecond))
	fmt.Printf("     idle fleet (baseline): hub VmRSS %s, hub CPU %.1f%% of a core, agent VmRSS median %s; hub twin-write throttle %g/s\n",
		mib(idleHub.RSS), 100*idleRate, mib(idleAgent), limit)
	for i, rate := range b.rates {
		name := fmt.Sprintf("bench-%d", i+1)
		version := fmt.Sprintf("2.0.%d", i)
		rateText := fmt.Sprintf("--rate %g", rate)
		if rate == 0 {
			rateText = fmt.Sprintf("gwctl's default --rate (%g/s)", defRate)
			rate = defRate
		}
		cpu0, _ := fleet.ReadCPU(f.Hub.PID())
		start := time.Now()
		res, err := f.Drive(ctx, fleet.RolloutRun{Name: name, IDs: ids, Waves: b.waves, Rate: rate, Via: b.via, Version: version,
			Logf: func(format string, args ...any) { fmt.Fprintf(os.Stderr, "fleet bench: "+format+"\n", args...) }})
		if err != nil {
			return fmt.Errorf("rollout %s: %w", name, err)
		}
		wall := time.Since(start)
		cpu1, _ := fleet.ReadCPU(f.Hub.PID())
		hub, _ := fleet.ReadMem(f.Hub.PID())
		agent := medianRSS(f, ids)
		runRate := (cpu1 - cpu0).Seconds() / wall.Seconds()
		h := res.Hub
		fmt.Printf("\n  fleet 2.%d rollout %s of %d gateways to %s, waves %s, %s:\n", i+1, name, held, version, strings.Join(b.waves, ","), rateText)
		fmt.Printf("     wall time start to last completed device %s; first (wave 1's device) %s (baseline: one gateway's update), x%.1f;\n",
			res.LastEnded.Round(time.Millisecond), res.FirstEnded.Round(time.Millisecond), ratio(res.LastEnded, res.FirstEnded))
		if rate > 0 {
			fmt.Printf("     the rollout's twin writes alone take %.0f s at %g/s; completed %d, failed %d; gwctl rollout --watch exit 0\n",
				float64(held)/min(rate, cmp.Or(limit, rate)), rate, res.Completed, res.Failed)
		} else {
			fmt.Printf("     completed %d, failed %d\n", res.Completed, res.Failed)
		}
		fmt.Printf("     hub twin writes: %d, 429 ThrottlingException answers %d; peak %.1f/s, mean %.1f/s against the throttle of %g/s\n",
			h.Writes, h.Throttled, h.Peak, h.Mean, h.Limit)
		fmt.Printf("       (peak x%.2f, mean x%.2f the throttle; hub counters sampled %d times, about every second)\n",
			safeDiv(h.Peak, h.Limit), safeDiv(h.Mean, h.Limit), h.Samples)
		fmt.Printf("     desired firmware writes in the largest wave (%d devices, hub's $metadata times): %.1f/s against --rate %g/s\n",
			res.WaveSize, res.WriteRate, rate)
		fmt.Printf("     hub VmRSS %s (idle: %s, x%.2f), VmHWM %s; hub CPU %.1f%% of a core (idle: %.1f%%), %.1f s in all\n",
			mib(hub.RSS), mib(idleHub.RSS), ratio64(hub.RSS, idleHub.RSS), mib(hub.HWM), 100*runRate, 100*idleRate, (cpu1 - cpu0).Seconds())
		fmt.Printf("     agent VmRSS median %s after the rollout (idle before the first: %s, x%.2f)\n", mib(agent), mib(idleAgent), ratio64(agent, idleAgent))
	}
	return nil
}

func safeDiv(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

func medianAnon(f *fleet.Fleet, ids []string) int64 {
	return medianMem(f, ids, func(m fleet.Mem) int64 { return m.Anon })
}

func medianRSS(f *fleet.Fleet, ids []string) int64 {
	return medianMem(f, ids, func(m fleet.Mem) int64 { return m.RSS })
}

// medianMem is the median of one /proc figure over the running agents of ids.
func medianMem(f *fleet.Fleet, ids []string, of func(fleet.Mem) int64) int64 {
	var v []time.Duration // reuse Median: KiB as durations
	for _, id := range ids {
		if p := f.Agent(id); p != nil {
			if m, err := fleet.ReadMem(p.PID()); err == nil {
				v = append(v, time.Duration(of(m)))
			}
		}
	}
	return int64(fleet.Median(v))
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

func msList(ds []time.Duration) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = fmt.Sprintf("%.0f", float64(d)/float64(time.Millisecond))
	}
	return out
}

func mib(kib int64) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }

func ratio(a, b time.Duration) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

func ratio64(a, b int64) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}
