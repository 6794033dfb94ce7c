// Command fleet runs a fleet of real gwagent processes on one gwhub
// (package test/fleet) for `make fleet-demo` and `make bench`:
//
//	fleet demo  -bin build [-devices 20 -offline 3 -bad 2]
//	fleet bench -bin build [-reps 10] [-devices 1000 -via gwctl|desired -rate 20] [-hub-args ...]
//
// It needs gwhub, gwagent and gwctl in -bin (make build).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
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
	via := fs.String("via", "auto", "rollout driver: gwctl (gwctl rollout start --watch), desired (paced desired writes), or auto: gwctl when it has the rollout command, else desired")
	rate := fs.Float64("rate", 20, "twin writes per second at most")
	hubArgs := fs.String("hub-args", "", "more gwhub run flags, blank-separated (e.g. a twin-write throttle)")
	memShare := fs.Float64("mem-share", 0.5, "share of MemAvailable the agents may take")
	_ = fs.Parse(args)
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
	if *n > 0 {
		return benchRollout(ctx, c, *n, fleet.Via(*via), *rate, strings.Fields(*hubArgs), *memShare)
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
	fmt.Printf("\n  fleet 1. an offline gateway reconnecting, %d times each way, interleaved; from the agent's exec\n", reps)
	fmt.Printf("     to what the hub stores (service API polled every 5 ms); medians:\n")
	fmt.Printf("     plain reconnect (desired firmware it already runs, written while offline): ac 200 stored %s (baseline)\n", ms(plain))
	fmt.Printf("     desired update written while offline: its ac 202 (update started) stored %s\n", ms(started))
	fmt.Printf("     ratio %.2f (goal <= 1.5), +%s; connected (both): %s\n", ratio(started, plain), ms(started-plain), ms(conn))
	fmt.Printf("     (all, ms: plain %v; update %v; connected %v)\n", msList(r.Plain), msList(r.Started), msList(r.Connected))
	return nil
}

func benchRollout(ctx context.Context, c common, n int, via fleet.Via, rate float64, hubArgs []string, memShare float64) error {
	// Every device is registered; agents start in batches below.
	all := make([]int, n)
	for i := range all {
		all[i] = i
	}
	devs := fleet.Plan(n, nil, all)
	f, err := fleet.Start(ctx, fleet.Options{Bin: c.bin, Dir: filepath.Join(c.dir, "rollout"), Devices: devs, HubArgs: hubArgs,
		Stages: fleet.Stages{Download: 2 * time.Second, Apply: 2 * time.Second}, StartConcurrency: 32, ImageSize: 64 << 10})
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	if via == "auto" {
		via = fleet.ViaDesired
		if _, _, code, err := f.Gwctl(ctx, "rollout", "list"); err == nil && code == 0 {
			via = fleet.ViaGwctl
		}
	}
	ids := make([]string, n)
	for i, d := range devs {
		ids[i] = d.ID
	}
	probe := min(n, 10)
	if err := f.StartAgents(ctx, ids[:probe]...); err != nil {
		return err
	}
	if err := sleepCtx(ctx, 5*time.Second); err != nil {
		return err
	}
	per := medianRSS(f, ids[:probe])
	avail, err := fleet.MemAvailable()
	if err != nil {
		return err
	}
	held := n
	if per > 0 {
		held = min(n, probe+int(float64(avail)*memShare/float64(per)))
	}
	fmt.Fprintf(os.Stderr, "fleet bench: agent VmRSS %d KiB, MemAvailable %d KiB: starting %d of %d agents\n", per, avail, held, n)
	t0 := time.Now()
	if err := f.StartAgents(ctx, ids[probe:held]...); err != nil {
		return err
	}
	startAll := time.Since(t0)
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

	cpu0, _ := fleet.ReadCPU(f.Hub.PID())
	start := time.Now()
	res, err := f.Drive(ctx, fleet.RolloutRun{Name: "bench-2-0", IDs: ids, Waves: []string{"1", "10%", "50%", "100%"},
		Rate: rate, Via: via, Logf: func(format string, args ...any) { fmt.Fprintf(os.Stderr, "fleet bench: "+format+"\n", args...) }})
	if err != nil {
		return err
	}
	wall := time.Since(start)
	cpu1, _ := fleet.ReadCPU(f.Hub.PID())
	hub, _ := fleet.ReadMem(f.Hub.PID())
	agent := medianRSS(f, ids)

	idleRate := (idleCPU1 - idleCPU0).Seconds() / 10
	runRate := (cpu1 - cpu0).Seconds() / wall.Seconds()
	fmt.Printf("\n  fleet 2. a rollout to %d real gwagent processes (asked for %d; %d KiB each, MemAvailable %d KiB),\n", held, n, per, avail)
	fmt.Printf("     driven by %s, waves 1,10%%,50%%,100%%, at most %g twin writes/s; simulated stages 2s+2s;\n", via, rate)
	fmt.Printf("     %d agents started and connected in %s\n", held-probe, startAll.Round(time.Millisecond))
	fmt.Printf("     wall time to the last ended device %s; first ended %s (baseline: one gateway's update); ratio %.1f\n",
		res.LastEnded.Round(time.Millisecond), res.FirstEnded.Round(time.Millisecond), ratio(res.LastEnded, res.FirstEnded))
	fmt.Printf("     completed %d, failed %d\n", res.Completed, res.Failed)
	fmt.Printf("     hub VmRSS %s (idle with the fleet connected: %s, x%.2f), VmHWM %s\n", mib(hub.RSS), mib(idleHub.RSS), ratio64(hub.RSS, idleHub.RSS), mib(hub.HWM))
	fmt.Printf("     hub CPU %.1f%% of a core during the rollout (idle: %.1f%%), %.1f s in all\n", 100*runRate, 100*idleRate, (cpu1 - cpu0).Seconds())
	fmt.Printf("     agent VmRSS median %s after the rollout (idle before: %s, x%.2f)\n", mib(agent), mib(idleAgent), ratio64(agent, idleAgent))
	fmt.Printf("     desired firmware writes in the largest wave (%d devices): %.1f/s against the rate of %g/s (x%.2f)\n",
		res.WaveSize, res.WriteRate, rate, res.WriteRate/rate)
	return nil
}

func medianRSS(f *fleet.Fleet, ids []string) int64 {
	var v []time.Duration // reuse Median: KiB as durations
	for _, id := range ids {
		if p := f.Agent(id); p != nil {
			if m, err := fleet.ReadMem(p.PID()); err == nil {
				v = append(v, time.Duration(m.RSS))
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
