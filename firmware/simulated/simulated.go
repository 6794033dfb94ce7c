package simulated

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/internal/atomicfile"
)

// Stage names accepted by Config.FailAt (the tutorial's firmwareStatus
// values).
const (
	StageStandBy     = "standBy"
	StageDownloading = "downloading"
	StageApplying    = "applying"
)

// Config shapes the simulated stages. The zero value of a duration means no
// wait; DefaultConfig has the tutorial's 15 s per stage.
type Config struct {
	// WaitBeforeDownload is the stand-by time after an update is accepted.
	WaitBeforeDownload time.Duration `yaml:"waitBeforeDownload" mapstructure:"waitBeforeDownload"`
	// Download is how long the download stage takes when fwPackageUri is not
	// an http(s) URL (the tutorial's "test.com"). http(s) URLs are really
	// downloaded; when the request declares the image's size, the bytes are
	// paced to take at least this long, so progress can be watched (an
	// undeclared size downloads as fast as the network allows).
	Download time.Duration `yaml:"download" mapstructure:"download"`
	// Apply is how long the applying stage takes.
	Apply time.Duration `yaml:"apply" mapstructure:"apply"`
	// SimulatedSize is how many bytes the time-only download produces
	// (default 1 MiB), so progress has bytes and percent.
	SimulatedSize int64 `yaml:"simulatedSize" mapstructure:"simulatedSize"`
	// FailAt makes the named stage fail ("standBy", "downloading",
	// "applying"); empty means never. For tests and demos of the failed path.
	FailAt string `yaml:"failAt" mapstructure:"failAt"`
	// FailMessage is the reason reported when FailAt triggers.
	FailMessage string `yaml:"failMessage" mapstructure:"failMessage"`
	// StateDir keeps the simulated current version across restarts; empty
	// keeps it in memory only.
	StateDir string `yaml:"stateDir" mapstructure:"stateDir"`
	// InitialVersion is the version reported before any update completed.
	InitialVersion string `yaml:"initialVersion" mapstructure:"initialVersion"`
}

// DefaultConfig returns the tutorial's timings: 15 s for each stage.
func DefaultConfig() Config {
	return Config{
		WaitBeforeDownload: 15 * time.Second,
		Download:           15 * time.Second,
		Apply:              15 * time.Second,
		SimulatedSize:      1 << 20,
		InitialVersion:     "1.0.0",
	}
}

// ErrInjected is wrapped by every failure caused by Config.FailAt.
var ErrInjected = errors.New("simulated: injected failure")

const versionFile = "simulated-version.json"

// Installer is the simulated backend. It implements firmware.Installer and
// the Checker, Preparer, Fetcher and Versioner abilities; it needs no reboot
// and cannot roll back, like the tutorial's device.
type Installer struct {
	cfg Config
	log *zap.Logger

	mu      sync.Mutex // guards version
	version string
}

var (
	_ firmware.Installer = (*Installer)(nil)
	_ firmware.Checker   = (*Installer)(nil)
	_ firmware.Preparer  = (*Installer)(nil)
	_ firmware.Fetcher   = (*Installer)(nil)
	_ firmware.Versioner = (*Installer)(nil)
)

// New checks cfg and loads the persisted simulated version.
func New(cfg Config, log *zap.Logger) (*Installer, error) {
	if log == nil {
		log = zap.NewNop()
	}
	switch cfg.FailAt {
	case "", StageStandBy, StageDownloading, StageApplying:
	default:
		return nil, fmt.Errorf("simulated: failAt: unknown stage %q (known: %s, %s, %s)",
			cfg.FailAt, StageStandBy, StageDownloading, StageApplying)
	}
	if cfg.WaitBeforeDownload < 0 || cfg.Download < 0 || cfg.Apply < 0 {
		return nil, errors.New("simulated: stage durations must not be negative")
	}
	if cfg.SimulatedSize <= 0 {
		cfg.SimulatedSize = 1 << 20
	}
	if cfg.StateDir != "" {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("simulated: state dir: %w", err)
		}
	}
	v, err := ReadVersion(cfg)
	if err != nil {
		return nil, err
	}
	return &Installer{cfg: cfg, log: log, version: v}, nil
}

// ReadVersion returns the simulated current version persisted in
// cfg.StateDir (cfg.InitialVersion before any update completed) without
// creating or writing anything.
func ReadVersion(cfg Config) (string, error) {
	if cfg.StateDir == "" {
		return cfg.InitialVersion, nil
	}
	b, err := os.ReadFile(filepath.Join(cfg.StateDir, versionFile))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return cfg.InitialVersion, nil
	case err != nil:
		return "", fmt.Errorf("simulated: read version: %w", err)
	}
	var st struct {
		Version string `json:"version"`
	}
	// A torn or empty file counts as missing.
	if json.Unmarshal(b, &st) != nil || st.Version == "" {
		return cfg.InitialVersion, nil
	}
	return st.Version, nil
}

func (i *Installer) fail(stage string) error {
	msg := i.cfg.FailMessage
	if msg == "" {
		msg = "simulated failure while " + stage
	}
	return fmt.Errorf("%w: %s", ErrInjected, msg)
}

// Check accepts every request: any URI works (non-http ones are simulated).
func (i *Installer) Check(firmware.Request) error { return nil }

// Prepare is the tutorial's stand-by wait before the download.
func (i *Installer) Prepare(ctx context.Context, u firmware.Update) error {
	i.log.Info("standing by before download", zap.String("update_id", u.ID), zap.Duration("wait", i.cfg.WaitBeforeDownload))
	if err := wait(ctx, i.cfg.WaitBeforeDownload); err != nil {
		return err
	}
	if i.cfg.FailAt == StageStandBy {
		return i.fail(StageStandBy)
	}
	return nil
}

// Fetches claims every URI without an http(s) scheme.
func (i *Installer) Fetches(uri string) bool {
	l := strings.ToLower(uri)
	return !strings.HasPrefix(l, "http://") && !strings.HasPrefix(l, "https://")
}

// Fetch simulates a download by time: SimulatedSize zero bytes written in
// steps spread over the Download duration.
func (i *Installer) Fetch(ctx context.Context, u firmware.Update, dst firmware.FetchWriter) error {
	const steps = 20
	size := i.cfg.SimulatedSize
	dst.SetTotal(size)
	chunk := make([]byte, 64<<10)
	var done int64
	for s := 1; s <= steps; s++ {
		if err := wait(ctx, i.cfg.Download/steps); err != nil {
			return err
		}
		if i.cfg.FailAt == StageDownloading && s > steps/2 {
			return i.fail(StageDownloading)
		}
		target := size * int64(s) / steps
		for done < target {
			n := min(int64(len(chunk)), target-done)
			if _, err := dst.Write(chunk[:n]); err != nil {
				return err
			}
			done += n
		}
	}
	return nil
}

// Open returns a sink that discards the bytes (the state machine still
// counts and hashes them, so size and sha256 checks are real).
func (i *Installer) Open(ctx context.Context, u firmware.Update, offset int64) (firmware.Sink, error) {
	// A time-only download fails half way in Fetch instead.
	sink := &discardSink{ctx: ctx, fail: i.cfg.FailAt == StageDownloading && !i.Fetches(u.Request.URI), err: i.fail(StageDownloading)}
	if !i.Fetches(u.Request.URI) && u.Request.Size > 0 && i.cfg.Download > 0 {
		// Pace from the resume offset: the rest of the image over the rest
		// of the stage.
		sink.pace = i.cfg.Download
		sink.start = time.Now().Add(-time.Duration(float64(i.cfg.Download) * float64(offset) / float64(u.Request.Size)))
		sink.size, sink.written = u.Request.Size, offset
	}
	return sink, nil
}

// Apply is the tutorial's applying stage; afterwards the target version is
// the current one.
func (i *Installer) Apply(ctx context.Context, u firmware.Update) error {
	i.log.Info("applying image", zap.String("update_id", u.ID), zap.Duration("wait", i.cfg.Apply))
	if err := wait(ctx, i.cfg.Apply); err != nil {
		return err
	}
	if i.cfg.FailAt == StageApplying {
		return i.fail(StageApplying)
	}
	if u.Request.Version == "" {
		return nil
	}
	return i.setVersion(u.Request.Version)
}

// CurrentVersion is the version of the last applied update.
func (i *Installer) CurrentVersion(context.Context) (string, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.version, nil
}

func (i *Installer) setVersion(v string) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.cfg.StateDir != "" {
		b, _ := json.Marshal(struct {
			Version string `json:"version"`
		}{v})
		if err := atomicfile.WriteFile(filepath.Join(i.cfg.StateDir, versionFile), b, 0o600); err != nil {
			return fmt.Errorf("simulated: write version: %w", err)
		}
	}
	i.version = v
	return nil
}

// discardSink drops the bytes; with failure injection its first write fails.
type discardSink struct {
	ctx  context.Context
	fail bool
	err  error
	// Pacing of a real download (pace > 0): byte n is written no earlier
	// than start + pace*n/size.
	pace          time.Duration
	start         time.Time
	size, written int64
}

func (s *discardSink) Write(p []byte) (int, error) {
	if s.fail {
		return 0, s.err
	}
	s.written += int64(len(p))
	if s.pace > 0 {
		due := s.start.Add(time.Duration(float64(s.pace) * float64(min(s.written, s.size)) / float64(s.size)))
		if err := wait(s.ctx, time.Until(due)); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}
func (s *discardSink) Sync() error  { return nil }
func (s *discardSink) Close() error { return nil }

// wait sleeps for d or until ctx is done.
func wait(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Rebooter is the simulated reboot: it logs and remembers the time, so the
// agent can report lastReboot without restarting anything.
type Rebooter struct {
	log *zap.Logger

	mu   sync.Mutex // guards last
	last time.Time
}

// NewRebooter returns a Rebooter that logs to log.
func NewRebooter(log *zap.Logger) *Rebooter {
	if log == nil {
		log = zap.NewNop()
	}
	return &Rebooter{log: log}
}

var _ firmware.Rebooter = (*Rebooter)(nil)

// Reboot logs the simulated reboot.
func (r *Rebooter) Reboot(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r.mu.Lock()
	r.last = time.Now().UTC()
	r.mu.Unlock()
	r.log.Info("simulated reboot: nothing is restarted")
	return nil
}

// LastReboot is the time of the last simulated reboot (zero if none).
func (r *Rebooter) LastReboot() time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last
}
