package firmware

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware/signature"
)

// Config configures a Manager. StateDir and Installer are required; every
// other field has a default.
type Config struct {
	// StateDir holds the persisted update record and download checkpoint.
	StateDir string
	// Installer is the backend the state machine drives.
	Installer Installer
	// Observer receives every Progress, in order, on the state machine's
	// goroutine (and on Start's caller for "accepted"). It must return quickly
	// (the machine waits for it); it may call Status but not Start.
	//
	// Every phase change is reported. While downloading, progress is
	// reported each time the whole percentage of the transfer changes (once
	// per MiB when the server does not say how big the image is) and once
	// at the end: about a hundred calls per download whatever the image
	// size, never one per buffer. There is no clock here: how often
	// progress goes further (to the twin) is the Observer's decision
	// (twin/report's MinInterval and MinPercentStep).
	Observer func(Progress)
	// Log is the component logger (named by the caller).
	Log *zap.Logger
	// HTTPClient downloads images. The default has dial, TLS and response
	// header timeouts; the whole download is bounded by DownloadTimeout.
	HTTPClient *http.Client
	// CurrentVersion is the running firmware version when neither the
	// Installer (Versioner) nor a completed update says otherwise.
	CurrentVersion string
	// Signatures, when set, is the minisign signature policy: trusted keys
	// and whether unsigned images are allowed. A request's signatureUri is
	// fetched before the image, the signature is checked while streaming and
	// an image that fails is never applied. Nil means no signature is checked
	// (a signatureUri is then ignored, with a warning).
	Signatures *signature.Policy
	// Compatible is the device type (device.compatible) that the signed
	// metadata of an image (signature.Manifest, in the trusted comment)
	// must list. The metadata is checked as soon as the signature is
	// fetched, before the image: it must fit this device and, unless it
	// allows a downgrade, be newer than the running version. When
	// unsigned images are not allowed and Compatible is set, a signature
	// without metadata is refused too.
	Compatible string
	// HealthCheck, when set, must pass after a trial boot before the
	// Committer commits; an error rolls the update back.
	HealthCheck func(ctx context.Context) error

	// DownloadTimeout is the overall budget of one download run, retries
	// included (default 2h).
	DownloadTimeout time.Duration
	// IdleTimeout aborts and retries a connection that delivers no byte for
	// this long (default 60s).
	IdleTimeout time.Duration
	// StallTimeout ends a download failed when no new byte of the image
	// arrived for this long, across attempts (default 3m): the clock runs
	// from the start of the download (or of the signature download) and
	// from each new byte, and is not reset by reconnecting. The error is
	// the last attempt's, naming the URL and the bytes received and
	// expected. A retry that would start after it has run out is not
	// made.
	StallTimeout time.Duration
	// RetryInitialInterval and RetryMaxInterval shape the exponential backoff
	// between download attempts, and between attempts to write a state file
	// that could not be written (defaults 1s and 1m); RetryMaxElapsed gives
	// up a download after failing this long without receiving a byte
	// (default 10m). A state file is retried until it can be written.
	RetryInitialInterval time.Duration
	RetryMaxInterval     time.Duration
	RetryMaxElapsed      time.Duration
	// CheckpointBytes is how many bytes are written between two durable
	// checkpoints (default 16 MiB; one is also made every 5s). Each
	// checkpoint fsyncs the sink and writes the checkpoint file, off the
	// streaming goroutine, and lets the read-back (ReadBacker) read the
	// bytes it made durable; the stream waits when it gets two intervals
	// ahead of the last durable checkpoint. The trade-off: after a kill -9
	// up to about two intervals (plus what the kernel had buffered) are
	// downloaded again, while a smaller interval means more fsyncs and
	// checkpoint files, a fixed cost each that holds the stream back on a
	// disk that is also being read back (and on slow flash). The 5s rule
	// makes windows shorter on links slower than about 3 MB/s, so a kill -9
	// costs at most about 10s of downloading at any speed. On the benchmark
	// machine (test/bench/run.sh, 1 GiB over loopback, a loaded 2-core VM)
	// the whole install ran at about 0.84, 0.87 and 0.95 of `curl | dd
	// conv=fsync` with 4, 8 and 16 MiB.
	CheckpointBytes int64
	// RebootTimeout is how long the machine waits to be stopped after it
	// asked for a reboot before it counts the reboot as failed (default 5m).
	RebootTimeout time.Duration
	// MaxTransitions caps persisted phase changes and resumes of one update
	// (default 32), so a boot loop never becomes an update loop.
	MaxTransitions int
	// AllowedHosts, when not empty, are the only hosts images and
	// signatures are downloaded from: host names, IP addresses, or
	// "*.example.com" for any name below example.com (ValidHostPattern).
	// Start refuses a request naming another host, and a download refuses a
	// redirect to one. Whatever the list, a redirect from https to http is
	// refused.
	AllowedHosts []string
	// Window, when set, is the device's maintenance window (ParseWindow):
	// the window of every request that does not carry its own.
	Window *Window
	// AdaptiveFallback is what an adaptive install (Request.IndexURI) does
	// when it cannot go on: the index cannot be fetched or does not
	// verify, the installer has no local blocks, the server ignores Range
	// requests. AdaptiveFallbackFull (the default) downloads the whole
	// image instead; AdaptiveFallbackFail ends the update failed.
	AdaptiveFallback string
	// MaxRangeBytes bounds one Range request of an adaptive install
	// (default 1 MiB, what CDNs serve best; at least one block).
	MaxRangeBytes int64
	// AdaptiveMinReuse is the share of the new image the device must hold
	// for an adaptive install to assemble it (default 0.03); below it the
	// install is a plain full download (reported as the adaptive
	// fallback), because then the Range requests and the hashing of every
	// block cost more than the few bytes they save. Negative: always
	// assemble.
	AdaptiveMinReuse float64

	// writeFile replaces a state file (atomicfile.WriteFile when nil);
	// the package's tests set it to make the disk look full.
	writeFile func(path string, data []byte, perm os.FileMode) error
}

func (c *Config) setDefaults() {
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
	if c.Observer == nil {
		c.Observer = func(Progress) {}
	}
	if c.HTTPClient == nil {
		c.HTTPClient = defaultHTTPClient()
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.DownloadTimeout, 2*time.Hour)
	def(&c.IdleTimeout, time.Minute)
	def(&c.StallTimeout, 3*time.Minute)
	def(&c.RetryInitialInterval, time.Second)
	def(&c.RetryMaxInterval, time.Minute)
	def(&c.RetryMaxElapsed, 10*time.Minute)
	def(&c.RebootTimeout, 5*time.Minute)
	if c.CheckpointBytes <= 0 {
		c.CheckpointBytes = 16 << 20
	}
	if c.MaxTransitions <= 0 {
		c.MaxTransitions = 32
	}
	if c.AdaptiveFallback == "" {
		c.AdaptiveFallback = AdaptiveFallbackFull
	}
	if c.MaxRangeBytes <= 0 {
		c.MaxRangeBytes = 1 << 20
	}
	if c.AdaptiveMinReuse == 0 {
		c.AdaptiveMinReuse = DefaultAdaptiveMinReuse
	}
}

func defaultHTTPClient() *http.Client {
	return &http.Client{Transport: NewTransport(nil)}
}

// NewTransport is the HTTP transport for image downloads: bounded dial,
// handshake and header waits, few idle connections: as many per host as
// an adaptive install has Range requests in flight (maxInFlight), so that
// over HTTP/1.1 they reuse their connections instead of dialling (and
// handshaking) again for every request. tlsConfig may be nil (the system
// roots).
func NewTransport(tlsConfig *tls.Config) *http.Transport {
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 15 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConns:          maxInFlight,
		MaxIdleConnsPerHost:   maxInFlight,
		ForceAttemptHTTP2:     true,
		TLSClientConfig:       tlsConfig,
	}
}

// Status is the Manager's view of the latest or running update.
type Status struct {
	Progress      // the latest progress; Phase is idle before any update
	Busy     bool // an update is running (a new Start gets *BusyError)
}

// Manager is the update state machine. Start accepts an update; Run drives
// it, persisting each phase before acting on it, and resumes an interrupted
// update after a restart. Only one update runs at a time.
type Manager struct {
	cfg   Config
	log   *zap.Logger
	store store
	hosts hostPatterns  // Config.AllowedHosts
	wake  chan struct{} // capacity 1: Start tells Run there is work

	mu      sync.Mutex // guards rec, last, started, readBack, backRead and problem*
	rec     record     // the persisted record (as last written)
	last    Progress   // the latest emitted progress
	started string     // id of the update Start accepted in this process
	// readBack is the id of the update whose stored image the verifying
	// phase read back and matched in this process; consumed by the next
	// Apply (Update.ReadBackVerified). Memory only: a restart clears it.
	readBack string
	// backRead is what the read-back behind the download of this run
	// found, for the verifying phase that follows (memory only).
	backRead readBackResult
	// problem says why the running update is held: a state file cannot be
	// written (hold.go). Nil when nothing holds it. problemSince is when
	// it began, problemPhase the record's phase then.
	problem      *UpdateError
	problemSince time.Time
	problemPhase Phase
	// retry is the download's pending retry (Progress.Retry), nil when
	// none; reported only in the downloading phase.
	retry *Retry
	// adaptive is the adaptive install's status (Progress.Adaptive) of
	// update adaptiveID, nil when it has none (adaptive.go).
	adaptive   *AdaptiveStatus
	adaptiveID string
	// stepStop and stepDone belong to the step drive is running (nil
	// between steps): Cancel stops it and waits for it (cancel.go).
	// cancelled is the id of the update Cancel ended in this process;
	// persist refuses to change its record after that.
	stepStop  context.CancelCauseFunc
	stepDone  chan struct{}
	cancelled string

	emitMu sync.Mutex // serialises Observer calls so they arrive in order; taken before mu
}

// NewManager loads the persisted state from cfg.StateDir (creating it).
func NewManager(cfg Config) (*Manager, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("firmware: Config.StateDir is required")
	}
	if cfg.Installer == nil {
		return nil, errors.New("firmware: Config.Installer is required")
	}
	cfg.setDefaults()
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("firmware: state dir: %w", err)
	}
	m := &Manager{cfg: cfg, log: cfg.Log, store: store{dir: cfg.StateDir, write: cfg.writeFile}, wake: make(chan struct{}, 1)}
	if cfg.Signatures != nil {
		if err := cfg.Signatures.Validate(); err != nil {
			return nil, fmt.Errorf("firmware: Config.Signatures: %w", err)
		}
	}
	if cfg.AdaptiveFallback != AdaptiveFallbackFull && cfg.AdaptiveFallback != AdaptiveFallbackFail {
		return nil, fmt.Errorf("firmware: Config.AdaptiveFallback %q (known: %s, %s)", cfg.AdaptiveFallback, AdaptiveFallbackFull, AdaptiveFallbackFail)
	}
	hosts, err := newHostPatterns(cfg.AllowedHosts)
	if err != nil {
		return nil, fmt.Errorf("firmware: Config.AllowedHosts: %w", err)
	}
	m.hosts = hosts
	if cfg.Window != nil {
		w, err := ParseWindow("update.window", *cfg.Window)
		if err != nil {
			return nil, fmt.Errorf("firmware: Config.Window: %w", err)
		}
		m.cfg.Window = &w
	}
	// A copy of the client with the redirect policy: the caller's stays as
	// it is (the transport is shared).
	hc := *cfg.HTTPClient
	hc.CheckRedirect = m.checkRedirect(cfg.HTTPClient.CheckRedirect)
	m.cfg.HTTPClient = &hc
	var rec record
	ok, err := m.store.readJSON(recordFile, &rec)
	if err != nil {
		return nil, err
	}
	if ok && rec.Format != stateFormat {
		m.log.Warn("unknown update record format; setting it aside", zap.Int("format", rec.Format))
		if err := m.store.setAside(recordFile); err != nil {
			return nil, fmt.Errorf("firmware: set aside %s: %w", recordFile, err)
		}
		ok = false
	}
	if !ok {
		rec = record{Format: stateFormat, Phase: PhaseIdle}
	}
	if rec.CurrentVersion == "" {
		rec.CurrentVersion = cfg.CurrentVersion
	}
	m.rec = rec
	m.last = m.progressOf(rec)
	if rec.busy() {
		m.wake <- struct{}{}
	}
	return m, nil
}

// Status returns the latest progress and whether an update is running.
func (m *Manager) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	return Status{Progress: m.last, Busy: m.rec.busy()}
}

// Start validates req, persists it as accepted and returns its update id at
// once; Run does the work. It returns a *BusyError while another update
// runs, and an error wrapping ErrInvalidRequest for a request this device
// cannot take.
func (m *Manager) Start(req Request) (string, error) {
	req, err := req.normalize()
	if err != nil {
		return "", err
	}
	if req.Window == nil && m.cfg.Window != nil {
		// The device's window, fixed with the request: a config change
		// later does not move the window of an accepted update.
		w := *m.cfg.Window
		req.Window = &w
	}
	inst := m.cfg.Installer
	if !isHTTP(req.URI) {
		if f, ok := inst.(Fetcher); !ok || !f.Fetches(req.URI) {
			return "", invalid("fwPackageUri %q: only http:// and https:// URLs are supported", redactURI(req.URI))
		}
	} else if err := m.checkHost("fwPackageUri", req.URI); err != nil {
		return "", err
	}
	if req.IndexURI != "" {
		if err := m.checkHost("indexUri", req.IndexURI); err != nil {
			return "", err
		}
	}
	if p := m.cfg.Signatures; p != nil {
		if err := p.Preflight(req.SignatureURI != ""); err != nil {
			return "", invalid("signatureUri is required: %v", err)
		}
		if req.SignatureURI != "" && !isHTTP(req.SignatureURI) {
			return "", invalid("signatureUri %q: only http:// and https:// URLs are supported", redactURI(req.SignatureURI))
		}
		if req.SignatureURI != "" {
			if err := m.checkHost("signatureUri", req.SignatureURI); err != nil {
				return "", err
			}
		}
	}
	if c, ok := inst.(Checker); ok {
		if err := c.Check(req); err != nil {
			if errors.Is(err, ErrInvalidRequest) {
				return "", err
			}
			return "", fmt.Errorf("%w: %w", ErrInvalidRequest, err)
		}
	}

	// Lock order everywhere: emitMu, then mu. Holding emitMu from before the
	// record is visible until the Observer returns keeps "accepted" ahead of
	// anything Run reports for this update.
	m.emitMu.Lock()
	defer m.emitMu.Unlock()
	m.mu.Lock()
	if m.rec.busy() {
		id := m.rec.UpdateID
		m.mu.Unlock()
		return "", &BusyError{UpdateID: id}
	}
	now := time.Now().UTC()
	rec := record{
		Format:         stateFormat,
		UpdateID:       uuid.NewString(),
		Phase:          PhaseAccepted,
		Request:        req,
		Transitions:    1,
		CurrentVersion: m.rec.CurrentVersion,
		StartedAt:      now,
		UpdatedAt:      now,
		History:        m.rec.History,
	}
	rec.noteHistory(now)
	// A checkpoint of an earlier update must never be resumed into this one;
	// it is also keyed by update id, this just frees the space early.
	if err := m.store.remove(checkpointFile); err != nil {
		m.mu.Unlock()
		return "", err
	}
	if err := m.store.writeJSON(recordFile, rec); err != nil {
		m.mu.Unlock()
		return "", err
	}
	m.rec = rec
	m.started = rec.UpdateID
	p := m.progressOf(rec)
	m.last = p
	m.mu.Unlock()
	m.cfg.Observer(p)

	m.log.Info("update accepted", zap.String("update_id", rec.UpdateID),
		zap.String("uri", redactURI(req.URI)), zap.String("version", req.Version))
	select {
	case m.wake <- struct{}{}:
	default:
	}
	return rec.UpdateID, nil
}

// Run resumes an interrupted update, then runs accepted ones until ctx is
// done. Call it once per Manager. A cancelled ctx is a normal stop: the
// update stays in its persisted phase and the next Run resumes it. A state
// file that cannot be written does not end Run either: the update is held
// and the write retried (Progress.Problem says why), so Run returns nil.
func (m *Manager) Run(ctx context.Context) error {
	m.refreshVersion(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-m.wake:
		}
		m.mu.Lock()
		busy := m.rec.busy()
		m.mu.Unlock()
		if !busy {
			continue
		}
		if err := m.drive(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, errCancelled) {
				continue
			}
			return err
		}
	}
}

// refreshVersion asks a Versioner backend which version runs.
func (m *Manager) refreshVersion(ctx context.Context) {
	v, ok := m.cfg.Installer.(Versioner)
	if !ok {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cur, err := v.CurrentVersion(cctx)
	if err != nil {
		m.log.Warn("cannot read the current firmware version", zap.Error(err))
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if cur != "" {
		m.rec.CurrentVersion = cur
		m.last.CurrentVersion = cur
	}
}

// maxRollbackTries caps rollback attempts (each may reboot once).
const maxRollbackTries = 5

// step runs the side effect of one phase and names the next phase.
type step func(m *Manager, ctx context.Context) (Phase, error)

// resumeTable says, for each persisted phase, why running its step again
// after a restart is right. The same steps drive an update that was never
// interrupted, so a resumed update takes exactly the normal path.
var resumeTable = map[Phase]struct {
	why  string
	step step
}{
	PhaseAccepted:         {"nothing was downloaded yet: prepare and start the download", (*Manager).stepAccepted},
	PhaseDownloading:      {"the download was interrupted: continue from the last durable checkpoint", (*Manager).stepDownloading},
	PhaseVerifying:        {"verification only reads: verify again from the finished download", (*Manager).stepVerifying},
	PhaseWaitingForWindow: {"the image is verified and kept: wait for the window again", (*Manager).stepWaitingForWindow},
	PhaseApplying:         {"Apply is idempotent: apply the verified image again", (*Manager).stepApplying},
	PhaseRebooting:        {"the reboot happened or was cut short: committing checks which", (*Manager).stepRebooting},
	PhaseCommitting:       {"verify the boot and commit again (both idempotent)", (*Manager).stepCommitting},
	PhaseRollingBack:      {"the rollback was interrupted or needed a reboot: roll back again (idempotent)", (*Manager).stepRollback},
	// Records of agents before rollingBack existed: rolledBack with
	// RollbackPending set.
	PhaseRolledBack: {"the rollback was interrupted: roll back again (idempotent)", (*Manager).stepRollback},
}

// drive runs the current update until it ends or ctx is done; the only
// error it returns is ctx's.
func (m *Manager) drive(ctx context.Context) error {
	m.mu.Lock()
	rec := m.rec
	resumed := rec.UpdateID != m.started
	m.mu.Unlock()
	log := m.log.With(zap.String("update_id", rec.UpdateID))
	row, ok := resumeTable[rec.Phase]
	if !ok {
		return m.fail(ctx, rec.Phase, coded(CodeInternal, fmt.Errorf("cannot resume from phase %q", rec.Phase)))
	}
	// Every (re)start of the machine counts as a transition: an agent that
	// crashes in the same phase again and again ends the update instead of
	// looping forever. Waiting for a maintenance window is the exception:
	// it does nothing that could crash, may last days, and a gateway
	// restarted (or power-cycled) that often meanwhile still applies the
	// update when the window opens.
	if resumed && rec.Phase == PhaseWaitingForWindow {
		log.Info("resuming update", zap.String("phase", string(rec.Phase)), zap.String("reason", row.why))
	} else if resumed {
		log.Info("resuming update", zap.String("phase", string(rec.Phase)), zap.String("reason", row.why))
		if err := m.persist(ctx, func(r *record) {}); err != nil {
			return err
		}
		if m.overLoop() && !rec.RollbackPending {
			return m.fail(ctx, rec.Phase, coded(CodeUpdateLoop, fmt.Errorf("update restarted or changed phase more than %d times", m.cfg.MaxTransitions)))
		}
	}
	for {
		// Each step, with the transition after it, runs under a context
		// Cancel can stop (cancel.go).
		rec, sctx, end, ok := m.beginStep(ctx)
		if !ok {
			return nil
		}
		if err := m.driveStep(ctx, sctx, rec); err != nil && !m.wasCancelled(rec.UpdateID) {
			end()
			return err
		}
		end()
	}
}

// driveStep runs the step of rec's phase under sctx and then fails the
// update or moves it on. A step stopped because its update was cancelled
// ends there: Cancel has already ended the record.
func (m *Manager) driveStep(ctx, sctx context.Context, rec record) error {
	row, ok := resumeTable[rec.Phase]
	if !ok {
		return m.fail(sctx, rec.Phase, coded(CodeInternal, fmt.Errorf("no step for phase %q", rec.Phase)))
	}
	next, err := row.step(m, sctx)
	if ctx.Err() != nil {
		// Shutting down: leave the persisted phase as it is.
		return ctx.Err()
	}
	if m.wasCancelled(rec.UpdateID) {
		return nil
	}
	if err != nil {
		return m.fail(sctx, rec.Phase, err)
	}
	if next == PhaseRolledBack && (rec.Phase == PhaseRolledBack || rec.Phase == PhaseRollingBack) {
		// stepRollback persisted and reported the outcome itself.
		return nil
	}
	return m.transition(sctx, next)
}

// persist applies change to the record, bumps the transition counter and
// writes it durably before returning. A record that cannot be written
// holds the update where it is (see save): nothing is done that the record
// does not yet say, and the only error is ctx's.
func (m *Manager) persist(ctx context.Context, change func(r *record)) error {
	m.mu.Lock()
	held := fmt.Sprintf("the update waits in phase %s and retries", m.rec.Phase)
	m.mu.Unlock()
	var cancelled bool
	err := m.save(ctx, recordFile, held, func() error {
		m.mu.Lock()
		defer m.mu.Unlock()
		rec := m.rec
		if rec.UpdateID != "" && rec.UpdateID == m.cancelled {
			// Cancel ended this update: its record stays as Cancel left it.
			cancelled = true
			return nil
		}
		change(&rec)
		rec.Transitions++
		rec.UpdatedAt = time.Now().UTC()
		rec.noteHistory(rec.UpdatedAt)
		if err := m.store.writeJSON(recordFile, rec); err != nil {
			return err
		}
		m.rec = rec
		return nil
	})
	if err == nil && cancelled {
		return errCancelled
	}
	return err
}

func (m *Manager) overLoop() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.rec.Transitions > m.cfg.MaxTransitions
}

// transition persists the next phase and reports it; only then does the
// caller act on it.
func (m *Manager) transition(ctx context.Context, next Phase) error {
	m.mu.Lock()
	from := m.rec.Phase
	m.mu.Unlock()
	if m.overLoop() && !next.Terminal() {
		return m.fail(ctx, from, coded(CodeUpdateLoop, fmt.Errorf("update changed phase more than %d times", m.cfg.MaxTransitions)))
	}
	if next == PhaseCompleted {
		return m.complete(ctx)
	}
	if err := m.persist(ctx, func(r *record) {
		r.Phase = next
		if next == PhaseRebooting {
			r.RebootRequested = false
		}
	}); err != nil {
		return err
	}
	m.log.Info("update phase", zap.String("update_id", m.Status().UpdateID), zap.String("phase", string(next)))
	m.emitRecord()
	return nil
}

func (m *Manager) complete(ctx context.Context) error {
	m.mu.Lock()
	ver := m.rec.Request.Version
	m.mu.Unlock()
	if v, ok := m.cfg.Installer.(Versioner); ok {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		cur, err := v.CurrentVersion(cctx)
		cancel()
		if err == nil && cur != "" {
			ver = cur
		}
	}
	if err := m.persist(ctx, func(r *record) {
		r.Phase = PhaseCompleted
		r.Err = nil
		if ver != "" {
			r.CurrentVersion = ver
		}
	}); err != nil {
		return err
	}
	if err := m.store.remove(checkpointFile); err != nil {
		m.log.Warn("cannot remove the download checkpoint", zap.Error(err))
	}
	// Log from the record just persisted: Status still holds the progress
	// emitted before it, with the old version.
	m.mu.Lock()
	id, cur := m.rec.UpdateID, m.rec.CurrentVersion
	m.mu.Unlock()
	m.log.Info("update completed", zap.String("update_id", id), zap.String("version", cur))
	m.emitRecord()
	return nil
}

// fail ends the update after err in phase: with a rollback when the new
// image may already be in use and the backend can roll back, else failed.
func (m *Manager) fail(ctx context.Context, phase Phase, err error) error {
	ue := toUpdateError(phase, err)
	m.mu.Lock()
	id := m.rec.UpdateID
	m.mu.Unlock()
	log := m.log.With(zap.String("update_id", id), zap.String("phase", string(phase)))
	_, canRollback := m.cfg.Installer.(RollBacker)
	applied := phase == PhaseApplying || phase == PhaseRebooting || phase == PhaseCommitting
	if applied && canRollback {
		log.Warn("update failed; rolling back", zap.String("code", ue.Code), zap.String("reason", ue.Message))
		if perr := m.persist(ctx, func(r *record) {
			r.Phase = PhaseRollingBack
			r.RollbackPending = true
			r.Err = ue
		}); perr != nil {
			return perr
		}
		// Reported before the rollback acts: a rollback that reboots
		// must not leave the twin on the phase that failed.
		m.emitRecord()
		// Errors of the rollback itself are handled there (the update ends
		// failed) or retried by the next round of drive.
		if _, serr := m.stepRollback(ctx); serr != nil && ctx.Err() != nil {
			return ctx.Err()
		}
		return nil
	}
	log.Warn("update failed", zap.String("code", ue.Code), zap.String("reason", ue.Message))
	if perr := m.persist(ctx, func(r *record) {
		r.Phase = PhaseFailed
		r.Err = ue
		r.RollbackPending = false
	}); perr != nil {
		return perr
	}
	if err := m.store.remove(checkpointFile); err != nil {
		log.Warn("cannot remove the download checkpoint", zap.Error(err))
	}
	m.emitRecord()
	return nil
}

// stepRollback runs RollBacker.Rollback for a pending rollback. It returns
// the rolledBack phase; errors are handled here (the update ends failed).
func (m *Manager) stepRollback(ctx context.Context) (Phase, error) {
	m.mu.Lock()
	rec := m.rec
	m.mu.Unlock()
	if !rec.RollbackPending {
		return PhaseRolledBack, nil
	}
	log := m.log.With(zap.String("update_id", rec.UpdateID))
	rb, ok := m.cfg.Installer.(RollBacker)
	if !ok {
		return PhaseRolledBack, m.endFailed(ctx, rec, CodeRollback, "backend cannot roll back")
	}
	// The rollback has its own small budget: it must still run after the
	// transition cap ended the update, but must not loop either.
	if rec.RollbackTries >= maxRollbackTries {
		return PhaseRolledBack, m.endFailed(ctx, rec, CodeRollback, fmt.Sprintf("rollback did not finish after %d attempts", maxRollbackTries))
	}
	if perr := m.persist(ctx, func(r *record) { r.RollbackTries++ }); perr != nil {
		return PhaseRolledBack, perr
	}
	err := rb.Rollback(ctx, rec.update())
	if ctx.Err() != nil {
		return PhaseRolledBack, ctx.Err()
	}
	if errors.Is(err, ErrRebootPending) {
		rbt, ok := m.cfg.Installer.(Rebooter)
		if !ok {
			return PhaseRolledBack, m.endFailed(ctx, rec, CodeRollback, "rollback needs a reboot but the backend cannot reboot")
		}
		log.Info("rebooting to finish the rollback")
		return PhaseRolledBack, m.rebootAndWait(ctx, rbt)
	}
	if err != nil {
		return PhaseRolledBack, m.endFailed(ctx, rec, CodeRollback, fmt.Sprintf("rollback failed: %v (after: %s)", err, errMessage(rec.Err)))
	}
	// After a bootloader fallback the rollback only tidied the environment:
	// the new image never ran, so the update failed rather than rolled back.
	fellBack := rec.Err != nil && rec.Err.Code == CodeBootloaderRollback
	if perr := m.persist(ctx, func(r *record) {
		r.RollbackPending = false
		r.Phase = PhaseRolledBack
		if fellBack {
			r.Phase = PhaseFailed
		}
	}); perr != nil {
		return PhaseRolledBack, perr
	}
	if err := m.store.remove(checkpointFile); err != nil {
		log.Warn("cannot remove the download checkpoint", zap.Error(err))
	}
	log.Info("update rolled back", zap.String("reason", errMessage(rec.Err)))
	m.emitRecord()
	return PhaseRolledBack, nil
}

func errMessage(e *UpdateError) string {
	if e == nil {
		return ""
	}
	return e.Message
}

func (m *Manager) endFailed(ctx context.Context, rec record, code, msg string) error {
	if rec.Err != nil {
		msg += "; first error: " + rec.Err.Message
	}
	if perr := m.persist(ctx, func(r *record) {
		r.Phase = PhaseFailed
		r.RollbackPending = false
		r.Err = &UpdateError{Code: code, Message: msg}
	}); perr != nil {
		return perr
	}
	m.log.Error("update failed", zap.String("update_id", rec.UpdateID), zap.String("code", code), zap.String("reason", msg))
	m.emitRecord()
	return nil
}

func (m *Manager) stepAccepted(ctx context.Context) (Phase, error) {
	m.mu.Lock()
	u := m.rec.update()
	m.mu.Unlock()
	if s, ok := m.cfg.Installer.(Slotted); ok {
		slot, err := s.TargetSlot(ctx, u)
		if err != nil {
			return "", coded(CodePrepare, fmt.Errorf("target slot: %w", err))
		}
		if err := m.persist(ctx, func(r *record) { r.Slot = slot }); err != nil {
			return "", err
		}
	}
	if p, ok := m.cfg.Installer.(Preparer); ok {
		if err := p.Prepare(ctx, u); err != nil {
			return "", coded(CodePrepare, err)
		}
	}
	return PhaseDownloading, nil
}

func (m *Manager) stepDownloading(ctx context.Context) (Phase, error) {
	if _, err := m.download(ctx); err != nil {
		return "", err
	}
	return PhaseVerifying, nil
}

func (m *Manager) stepApplying(ctx context.Context) (Phase, error) {
	m.mu.Lock()
	u := m.rec.update()
	u.ReadBackVerified = m.readBack != "" && m.readBack == u.ID
	m.readBack = ""
	m.mu.Unlock()
	if err := m.cfg.Installer.Apply(ctx, u); err != nil {
		return "", coded(CodeApply, err)
	}
	switch m.cfg.Installer.(type) {
	case Rebooter:
		return PhaseRebooting, nil
	case Committer:
		return PhaseCommitting, nil
	}
	return PhaseCompleted, nil
}

// stepRebooting asks for the reboot once. Resumed with the request already
// persisted, the reboot happened (or never took effect): committing tells
// which through Committer.VerifyBoot.
func (m *Manager) stepRebooting(ctx context.Context) (Phase, error) {
	m.mu.Lock()
	requested := m.rec.RebootRequested
	m.mu.Unlock()
	if requested {
		return PhaseCommitting, nil
	}
	rbt, ok := m.cfg.Installer.(Rebooter)
	if !ok {
		return PhaseCommitting, nil
	}
	if err := m.persist(ctx, func(r *record) { r.RebootRequested = true }); err != nil {
		return "", err
	}
	if err := m.rebootAndWait(ctx, rbt); err != nil {
		return "", err
	}
	return PhaseCommitting, nil
}

// rebootAndWait asks for a reboot and waits to be stopped by it. Still
// running after RebootTimeout means the reboot did not happen.
func (m *Manager) rebootAndWait(ctx context.Context, rbt Rebooter) error {
	if err := rbt.Reboot(ctx); err != nil {
		return coded(CodeReboot, fmt.Errorf("reboot: %w", err))
	}
	t := time.NewTimer(m.cfg.RebootTimeout)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return coded(CodeReboot, fmt.Errorf("the device did not restart within %s of the reboot request", m.cfg.RebootTimeout))
	}
}

func (m *Manager) stepCommitting(ctx context.Context) (Phase, error) {
	m.mu.Lock()
	u := m.rec.update()
	m.mu.Unlock()
	c, isCommitter := m.cfg.Installer.(Committer)
	if isCommitter {
		err := c.VerifyBoot(ctx, u)
		if errors.Is(err, ErrRebootPending) {
			if _, ok := m.cfg.Installer.(Rebooter); ok {
				m.log.Warn("still running the old image; rebooting again", zap.String("update_id", u.ID))
				return PhaseRebooting, nil
			}
		}
		if errors.Is(err, ErrBootloaderFellBack) {
			return "", coded(CodeBootloaderRollback, fmt.Errorf("boot check: %w", err))
		}
		if err != nil {
			return "", coded(CodeBoot, fmt.Errorf("boot check: %w", err))
		}
	}
	if m.cfg.HealthCheck != nil {
		if err := m.cfg.HealthCheck(ctx); err != nil {
			return "", coded(CodeHealth, fmt.Errorf("health check: %w", err))
		}
	}
	if isCommitter {
		if err := c.Commit(ctx, u); err != nil {
			return "", coded(CodeCommit, fmt.Errorf("commit: %w", err))
		}
	}
	return PhaseCompleted, nil
}

// emitRecord reports the current record as Progress.
func (m *Manager) emitRecord() {
	m.emitMu.Lock()
	defer m.emitMu.Unlock()
	m.mu.Lock()
	p := m.progressOf(m.rec)
	m.last = p
	m.mu.Unlock()
	m.cfg.Observer(p)
}

// setRetry reports that the download waits to try again.
func (m *Manager) setRetry(rt Retry) {
	m.emitMu.Lock()
	defer m.emitMu.Unlock()
	m.mu.Lock()
	m.retry = &rt
	p := m.progressOf(m.rec)
	m.last = p
	m.mu.Unlock()
	m.cfg.Observer(p)
}

// clearRetry reports that the download goes on (a new byte arrived), if
// a retry was reported.
func (m *Manager) clearRetry() {
	m.mu.Lock()
	had := m.retry != nil
	m.mu.Unlock()
	if had {
		m.emitMu.Lock()
		defer m.emitMu.Unlock()
		m.mu.Lock()
		m.retry = nil
		p := m.progressOf(m.rec)
		m.last = p
		m.mu.Unlock()
		m.cfg.Observer(p)
	}
}

// dropRetry forgets a retry without reporting: the download ended, and
// the next progress (a phase) is reported without it.
func (m *Manager) dropRetry() {
	m.mu.Lock()
	m.retry = nil
	m.mu.Unlock()
}

// emitBytes reports download progress without persisting it.
func (m *Manager) emitBytes(done, total int64) {
	m.emitMu.Lock()
	defer m.emitMu.Unlock()
	m.mu.Lock()
	if !m.rec.busy() {
		// Cancelled while the last bytes were on their way.
		m.mu.Unlock()
		return
	}
	m.rec.Bytes, m.rec.Total = done, total
	p := m.progressOf(m.rec)
	m.last = p
	m.mu.Unlock()
	m.cfg.Observer(p)
}

func (m *Manager) progressOf(r record) Progress {
	p := Progress{
		UpdateID:       r.UpdateID,
		Phase:          r.Phase,
		TargetVersion:  r.Request.Version,
		CurrentVersion: r.CurrentVersion,
		Bytes:          r.Bytes,
		Total:          r.Total,
		Percent:        -1,
		Slot:           r.Slot,
		History:        r.History,
		Time:           time.Now().UTC(),
	}
	if r.UpdateID == "" {
		p.Phase = PhaseIdle
	}
	if r.Phase == PhaseFailed || r.Phase == PhaseRolledBack || r.Phase == PhaseRollingBack {
		p.Err = r.Err
	}
	if m.retry != nil && r.Phase == PhaseDownloading {
		rt := *m.retry
		p.Retry = &rt
	}
	if m.adaptive != nil && r.UpdateID == m.adaptiveID && r.UpdateID != "" {
		a := *m.adaptive
		p.Adaptive = &a
	}
	if m.problem != nil && r.UpdateID != "" {
		pr := *m.problem
		p.Problem = &pr
	}
	if r.Total > 0 {
		p.Percent = int(r.Bytes * 100 / r.Total)
	}
	if w := r.Request.Window; w != nil && r.UpdateID != "" {
		p.Window = &WindowStatus{Window: *w}
		if r.Phase == PhaseWaitingForWindow {
			p.Window.OpensAt, _ = w.Next(p.Time)
		}
	}
	if r.Phase == PhaseCompleted || r.Phase == PhaseVerifying || r.Phase == PhaseWaitingForWindow || r.Phase == PhaseApplying ||
		r.Phase == PhaseRebooting || r.Phase == PhaseCommitting {
		p.Percent = 100
	}
	return p
}

// codedError carries the UpdateError code chosen where the error happened.
type codedError struct {
	code string
	err  error
}

func (e *codedError) Error() string { return e.err.Error() }
func (e *codedError) Unwrap() error { return e.err }

func coded(code string, err error) error {
	var ce *codedError
	if errors.As(err, &ce) {
		return err
	}
	return &codedError{code: code, err: err}
}

func toUpdateError(phase Phase, err error) *UpdateError {
	var ce *codedError
	if errors.As(err, &ce) {
		return &UpdateError{Code: ce.code, Message: err.Error()}
	}
	code := CodeInternal
	switch phase {
	case PhaseAccepted:
		code = CodePrepare
	case PhaseDownloading:
		code = CodeDownload
	case PhaseVerifying:
		code = CodeVerify
	case PhaseApplying:
		code = CodeApply
	case PhaseRebooting:
		code = CodeReboot
	case PhaseCommitting:
		code = CodeCommit
	}
	return &UpdateError{Code: code, Message: err.Error()}
}
