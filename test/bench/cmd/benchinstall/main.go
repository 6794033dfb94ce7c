// Command benchinstall runs one firmware update through the real
// firmware.Manager and the abpart installer (slot files, the "file" boot
// environment) for the benchmarks in test/bench/run.sh, as its own process
// so that its peak RSS can be measured and so it can be killed with -9 and
// started again on the same state.
//
// The device runs slot A; the image goes to slot B. The machine must not
// reboot, so the installer's reboot seam ends the run: the measurement stops
// at the reboot request, after the write, the read-back (behind the
// download) and the switch of the boot environment. On exit it prints one JSON line with the phase timings.
//
// Started with a state dir that holds an interrupted update, it does not
// start a new one: the Manager resumes the old one (the kill -9 benchmark).
//
// It owns nothing of the agent; it only wires the firmware packages together
// the way the agent does, with the defaults the agent uses.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/abpart"
	"github.com/gwagent/gwagent/firmware/bootenv"
)

// result is the JSON line printed on exit. Durations are seconds.
type result struct {
	Resumed bool  `json:"resumed"`
	Bytes   int64 `json:"bytes"`
	// Total runs from before NewManager to the reboot request.
	Total float64 `json:"total_s"`
	// Download is the downloading phase: HTTP, slot writes with a
	// checkpoint (fsync) every CheckpointBytes, final fsync and close, and
	// the slot read back (past the page cache) and hashed behind the
	// download, each checkpoint's bytes once they are durable.
	Download float64 `json:"download_s"`
	// Verify is the verifying phase: size, SHA-256 and read-back compared
	// (the slot is read back here only after a restart).
	Verify float64 `json:"verify_s"`
	// Apply is the applying phase: the switch (the slot is hashed again only after a restart between verifying and applying).
	Apply float64 `json:"apply_s"`
	Phase string  `json:"final_phase"`
	// Fetched, Reused and Fallback are the adaptive install's counts
	// (firmware.AdaptiveStatus) as last reported, for an update with
	// -index-url.
	Fetched  int64  `json:"bytes_fetched"`
	Reused   int64  `json:"bytes_reused"`
	Fallback string `json:"fallback,omitempty"`
	Error    string `json:"error,omitempty"`
}

type rebootFunc func(context.Context) error

func (f rebootFunc) Reboot(ctx context.Context) error { return f(ctx) }

func main() {
	url := flag.String("url", "", "image URL")
	indexURL := flag.String("index-url", "", "block index URL (indexUri): install adaptively, reusing slot A's blocks")
	sum := flag.String("sha256", "", "image SHA-256 (hex)")
	size := flag.Int64("size", 0, "image size in bytes")
	dir := flag.String("dir", "", "device folder: slot-a, slot-b, bootenv and state live here (created by the caller)")
	timeout := flag.Duration("timeout", 4*time.Minute, "give up after this long")
	checkpoint := flag.Int64("checkpoint-bytes", 0, "firmware.Config.CheckpointBytes (0: the default, 16 MiB)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the run here (for go tool pprof)")
	flag.Parse()
	if *dir == "" || *url == "" {
		fmt.Fprintln(os.Stderr, "benchinstall: -dir and -url are required")
		os.Exit(2)
	}
	var prof *os.File
	if *cpuProfile != "" {
		var err error
		if prof, err = os.Create(*cpuProfile); err == nil {
			err = pprof.StartCPUProfile(prof)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "benchinstall: cpu profile:", err)
			os.Exit(2)
		}
	}
	res, err := run(*dir, firmware.Request{URI: *url, IndexURI: *indexURL, SHA256: *sum, Size: *size, Version: "2.0.0"}, *checkpoint, *timeout)
	if prof != nil {
		pprof.StopCPUProfile()
		prof.Close()
	}
	if err != nil {
		res.Error = err.Error()
	}
	b, _ := json.Marshal(res)
	fmt.Println(string(b))
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchinstall:", err)
		os.Exit(1)
	}
}

func run(dir string, req firmware.Request, checkpoint int64, timeout time.Duration) (result, error) {
	var res result
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	log := zap.NewNop()
	env, err := bootenv.Open(bootenv.Config{Backend: "file", File: bootenv.FileConfig{Path: filepath.Join(dir, "bootenv")}}, nil, log)
	if err != nil {
		return res, err
	}

	var (
		mu       sync.Mutex
		phaseAt  = map[firmware.Phase]time.Time{}
		final    *firmware.Progress
		rebootAt time.Time
	)
	ended := make(chan struct{})
	var endOnce sync.Once
	end := func() { endOnce.Do(func() { close(ended) }) }

	reb := rebootFunc(func(context.Context) error {
		mu.Lock()
		rebootAt = time.Now()
		mu.Unlock()
		end()
		return nil
	})
	inst, err := abpart.New(abpart.Config{
		SlotA: filepath.Join(dir, "slot-a"), SlotB: filepath.Join(dir, "slot-b"), SlotType: abpart.SlotTypeFile,
		RunningSlot: bootenv.SlotA, StateDir: filepath.Join(dir, "abpart"),
	}, abpart.Deps{Env: env, Rebooter: reb, Log: log})
	if err != nil {
		return res, err
	}
	m, err := firmware.NewManager(firmware.Config{
		StateDir:        filepath.Join(dir, "firmware"),
		Installer:       inst,
		Log:             log,
		CurrentVersion:  "1.0.0",
		CheckpointBytes: checkpoint,
		Observer: func(p firmware.Progress) {
			mu.Lock()
			defer mu.Unlock()
			if _, seen := phaseAt[p.Phase]; !seen {
				phaseAt[p.Phase] = time.Now()
			}
			if p.Bytes > res.Bytes {
				res.Bytes = p.Bytes
			}
			if a := p.Adaptive; a != nil {
				res.Fetched, res.Reused, res.Fallback = a.BytesFetched, a.BytesReused, a.Fallback
			}
			if p.Phase.Terminal() {
				pp := p
				final = &pp
				end()
			}
		},
	})
	if err != nil {
		return res, err
	}
	res.Resumed = m.Status().Busy
	if !res.Resumed {
		if _, err := m.Start(req); err != nil {
			return res, fmt.Errorf("start: %w", err)
		}
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- m.Run(runCtx) }()
	select {
	case <-ended:
	case <-ctx.Done():
	}
	// The reboot request is the end of the measurement; stopping the Manager
	// now is what the shutdown that follows it would do.
	stop()
	runErr := <-done

	mu.Lock()
	defer mu.Unlock()
	res.Total = rebootAt.Sub(t0).Seconds()
	span := func(from, to time.Time) float64 {
		if from.IsZero() || to.IsZero() {
			return 0
		}
		return to.Sub(from).Seconds()
	}
	res.Download = span(phaseAt[firmware.PhaseDownloading], phaseAt[firmware.PhaseVerifying])
	res.Verify = span(phaseAt[firmware.PhaseVerifying], phaseAt[firmware.PhaseApplying])
	res.Apply = span(phaseAt[firmware.PhaseApplying], phaseAt[firmware.PhaseRebooting])
	res.Phase = string(m.Status().Phase)
	switch {
	case runErr != nil:
		return res, fmt.Errorf("run: %w", runErr)
	case final != nil && final.Err != nil:
		return res, fmt.Errorf("update ended %s: %s: %s", final.Phase, final.Err.Code, final.Err.Message)
	case final != nil:
		return res, fmt.Errorf("update ended %s without a reboot request", final.Phase)
	case rebootAt.IsZero():
		return res, errors.New("no reboot request within the timeout")
	}
	return res, nil
}
