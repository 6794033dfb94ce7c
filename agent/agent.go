package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/config"
	"github.com/gwagent/gwagent/agent/health"
	"github.com/gwagent/gwagent/agent/installer"
	"github.com/gwagent/gwagent/agent/router"
	"github.com/gwagent/gwagent/agent/session"
	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/signature"
	"github.com/gwagent/gwagent/internal/buildinfo"
	"github.com/gwagent/gwagent/twin"
	"github.com/gwagent/gwagent/twin/report"
	"github.com/gwagent/gwagent/twin/writable"
)

// Subdirectories of the state directory.
const (
	queueDir    = "twin-queue"
	firmwareDir = "firmware"
	// transportFile is where hub.transport auto remembers what worked.
	transportFile = "transport.json"
)

// reservedReported are the reported properties the agent writes itself; a
// desired property of the same name is never acknowledged over them.
var reservedReported = []string{
	"firmwareStatus", "logTime", "downloadComplete", "startedApplyingImage", "lastFirmwareUpdate",
	"firmware", "firmwareHistory", "iothubDM", "agent",
}

// Options build an Agent.
type Options struct {
	Config *config.Config
	// Log is the root logger; components get named children.
	Log *zap.Logger
	// Level is the level of Log, changed by the logLevel desired property
	// and by Reload. A zero AtomicLevel is replaced by a private one.
	Level zap.AtomicLevel
	// Notifier talks to the service manager; nil means systemd's
	// NOTIFY_SOCKET (a no-op when not run by systemd).
	Notifier Notifier
	// Installer, when set, replaces the backend named in the configuration.
	Installer *installer.Built
	// HTTPClient downloads images; nil means one that trusts the system
	// roots and hub.caFile.
	HTTPClient *http.Client
	// Systemd answers the health check's systemd questions; nil means
	// systemctl when the system was booted with systemd, else none.
	Systemd health.Systemd
}

// Agent is the daemon. Create it with New, run it once with Run.
type Agent struct {
	log      *zap.Logger
	level    zap.AtomicLevel
	notifier Notifier

	session   *session.Session
	queue     *twin.Queue
	manager   *firmware.Manager
	reporter  *report.Reporter
	router    *router.Router
	acker     *writable.Acker
	rebooter  firmware.Rebooter
	installer firmware.Installer
	freeOnce  sync.Once // returns start-up garbage to the OS after the first connect
	health    *health.Checker

	// installerType is installer.type as built (a change needs a restart).
	installerType string

	rebootCh      chan struct{} // cap 1: a reboot was answered, do it
	rebootPending atomic.Bool
	kick          chan struct{} // cap 1: recompute the status line
	saveKick      chan struct{} // cap 1: the queue's SaveProblem changed
	probeStatus   chan chan struct{}
	probeReboot   chan chan struct{}
	managerAlive  atomic.Bool
	held          *heldSink    // firmware.error while the update is held (held.go)
	desired       desiredState // the desired firmware (desired.go)

	onlineOnce sync.Once
	online     chan struct{} // closed at the first connect

	mu  sync.Mutex     // guards cfg
	cfg *config.Config // the configuration in effect (Reload swaps it)
}

// New opens the agent's state (the patch queue, the update record) and
// builds its parts. Nothing talks to the hub until Run.
func New(opts Options) (*Agent, error) {
	cfg := opts.Config
	if cfg == nil {
		return nil, errors.New("agent: no configuration")
	}
	log := opts.Log
	if log == nil {
		log = zap.NewNop()
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent: state directory: %w", err)
	}
	a := &Agent{
		log:         log.Named("agent"),
		level:       opts.Level,
		notifier:    opts.Notifier,
		cfg:         cfg,
		rebootCh:    make(chan struct{}, 1),
		kick:        make(chan struct{}, 1),
		saveKick:    make(chan struct{}, 1),
		probeStatus: make(chan chan struct{}),
		probeReboot: make(chan chan struct{}),
		online:      make(chan struct{}),
	}
	if a.level == (zap.AtomicLevel{}) {
		a.level = zap.NewAtomicLevel()
	}
	if a.notifier == nil {
		a.notifier = Systemd{}
	}

	built := opts.Installer
	if built == nil {
		b, err := installer.Build(cfg.Installer, installer.Deps{StateDir: cfg.StateDir, Log: log.Named("installer")})
		if err != nil {
			return nil, err
		}
		built = &b
	}
	a.rebooter = built.Rebooter
	a.installer = built.Installer
	a.installerType = cfg.Installer.Type

	// The router comes first: the session hands it every direct method.
	a.router = router.New(log.Named("methods"), 0)
	a.router.Handle("firmwareUpdate", a.handleFirmwareUpdate)
	a.router.Handle("reboot", a.handleReboot)
	a.router.Handle("cancelFirmwareUpdate", a.handleCancelFirmwareUpdate)

	var err error
	if a.session, err = a.newSession(cfg, log); err != nil {
		return nil, err
	}
	if a.queue, err = a.openQueue(cfg, log); err != nil {
		return nil, err
	}
	a.held = &heldSink{next: a.queue, log: log.Named("report")}
	a.reporter = report.New(a.held, report.Options{
		MinInterval:    cfg.Report.MinInterval,
		MinPercentStep: cfg.Report.MinPercentStep,
		Log:            log.Named("report"),
		OnProgress:     func(firmware.Progress) { a.kickStatus() },
	})
	a.health = a.newHealth(cfg, opts.Systemd, log)
	if a.manager, err = a.newManager(cfg, opts.HTTPClient, built.Installer, log); err != nil {
		_ = a.queue.Close()
		return nil, err
	}
	a.acker = writable.New(a.queue, reservedReported, log.Named("desired"))
	a.loadDesired()
	a.acker.Register("logLevel", a.logLevelProperty())
	return a, nil
}

// newSession is the hub session, handing direct methods to the router.
func (a *Agent) newSession(cfg *config.Config, log *zap.Logger) (*session.Session, error) {
	var identity session.IdentityFunc
	if cfg.Hub.ConnectionString.HostName == "" && cfg.Provisioning.IDScope != "" {
		p := &provisioner{cfg: cfg, stateDir: cfg.StateDir, log: log.Named("provision")}
		identity = p.identity
	}
	s, err := session.New(session.Config{
		Conn:             cfg.Hub.ConnectionString,
		Identity:         identity,
		Address:          cfg.Hub.Address,
		Transport:        cfg.Hub.Transport,
		WebSocketAddress: cfg.Hub.WebSocketAddress,
		Proxy:            hubProxy(cfg.Hub.Proxy),
		TransportFile:    filepath.Join(cfg.StateDir, transportFile),
		RootCAs:          cfg.Hub.RootCAs,
		Certificate:      cfg.Hub.Certificate,
		KeepAlive:        cfg.Hub.KeepAlive,
		SASTTL:           cfg.Hub.SASTTL,
		ConnectTimeout:   cfg.Hub.ConnectTimeout,
		RequestTimeout:   cfg.Hub.RequestTimeout,
		MinRetryDelay:    cfg.Hub.MinRetryDelay,
		MaxRetryDelay:    cfg.Hub.MaxRetryDelay,
		ClientType:       "gwagent/" + buildinfo.Get().Version,
		ModelID:          cfg.Hub.ModelID,
		Log:              log.Named("session"),
		Methods:          a.router,
		OnDesired:        a.onDesired,
		OnConnect:        a.onConnect,
	})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	return s, nil
}

// openQueue opens the reported-patch queue, published through the session.
func (a *Agent) openQueue(cfg *config.Config, log *zap.Logger) (*twin.Queue, error) {
	q, err := twin.OpenQueue(twin.QueueOptions{
		Dir:            filepath.Join(cfg.StateDir, queueDir),
		MinBackoff:     cfg.Hub.MinRetryDelay,
		MaxBackoff:     cfg.Hub.MaxRetryDelay,
		RequestTimeout: cfg.Hub.RequestTimeout,
		OnSaveProblem:  a.onSaveProblem,
		// A state change refused because the reported properties are
		// full goes through once the agent's own acknowledgements that it
		// can do without are withdrawn.
		MakeRoom: func(ctx context.Context, _ map[string]any) map[string]any { return a.acker.Withdrawal(ctx) },
	}, a.session, log.Named("twin"))
	if err != nil {
		return nil, fmt.Errorf("agent: open the reported-patch queue: %w", err)
	}
	return q, nil
}

// newHealth is the verdict that gates the commit of a trial boot.
func (a *Agent) newHealth(cfg *config.Config, sd health.Systemd, log *zap.Logger) *health.Checker {
	if sd == nil {
		sd = health.BootedSystemd()
	}
	return health.New(health.Config{
		Timeout:     cfg.Update.HealthTimeout,
		Online:      a.online,
		Acked:       a.queue.Flush,
		Systemd:     sd,
		SystemState: cfg.Update.HealthSystemState,
		Units:       cfg.Update.HealthUnits,
		Log:         log.Named("health"),
	})
}

// newManager opens the update state machine over the installer; client nil
// means the agent's own download client.
func (a *Agent) newManager(cfg *config.Config, client *http.Client, inst firmware.Installer, log *zap.Logger) (*firmware.Manager, error) {
	if client == nil {
		var err error
		if client, err = downloadClientVia(cfg.Hub.CAFile, cfg.Update.Proxy.Resolved()); err != nil {
			return nil, err
		}
	}
	m, err := firmware.NewManager(firmware.Config{
		StateDir:         filepath.Join(cfg.StateDir, firmwareDir),
		Installer:        inst,
		Observer:         a.observeUpdate,
		Log:              log.Named("firmware"),
		HTTPClient:       client,
		CurrentVersion:   cfg.CurrentVersion,
		HealthCheck:      a.healthCheck,
		DownloadTimeout:  cfg.Update.DownloadTimeout,
		StallTimeout:     cfg.Update.StallTimeout,
		AllowedHosts:     cfg.Update.AllowedHosts,
		AdaptiveFallback: cfg.Update.AdaptiveFallback,
		MaxRangeBytes:    int64(cfg.Update.MaxRangeBytes),
		AdaptiveMinReuse: adaptiveMinReuse(cfg.Update.AdaptiveMinReuse),
		Window:           cfg.Update.Window,
		Signatures:       &signature.Policy{KeyDir: cfg.Signature.KeyDir, AllowUnsigned: cfg.Signature.AllowUnsigned},
		Compatible:       cfg.Device.Compatible,
	})
	if err != nil {
		return nil, fmt.Errorf("agent: open the update state: %w", err)
	}
	return m, nil
}

func (a *Agent) config() *config.Config {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cfg
}

// Session exposes the hub session (health, for tests and status).
func (a *Agent) Session() *session.Session { return a.session }

// Run runs the agent until ctx is done (a normal stop: it returns nil after
// the graceful stop) or a part fails for good (it returns the error, so the
// service manager restarts it). Run may be called once.
func (a *Agent) Run(ctx context.Context) error {
	cfg := a.config()
	info := buildinfo.Get()
	a.reportStartup(ctx, cfg, info)

	// Each part has its own context so the stop can be done in order.
	mctx, stopManager := context.WithCancel(context.Background())
	qctx, stopQueue := context.WithCancel(context.Background())
	sctx, stopSession := context.WithCancel(context.Background())
	bctx, stopBackground := context.WithCancel(context.Background())
	defer stopManager()
	defer stopQueue()
	defer stopSession()
	defer stopBackground()

	a.warnStartup(cfg)

	// The state is open (New) and the parts start now: the agent works
	// locally, whether or not the hub answers.
	a.notify(notifyReady)

	fatal := make(chan error, 3)
	var mwg, rest sync.WaitGroup
	a.managerAlive.Store(true)
	mwg.Go(func() {
		defer a.managerAlive.Store(false)
		if err := a.manager.Run(mctx); err != nil {
			fatal <- fmt.Errorf("agent: firmware state machine: %w", err)
		}
	})
	rest.Go(func() {
		if err := a.queue.Run(qctx); err != nil {
			fatal <- fmt.Errorf("agent: reported-patch queue: %w", err)
		}
	})
	rest.Go(func() {
		if err := a.session.Run(sctx); err != nil {
			fatal <- fmt.Errorf("agent: session: %w", err)
		}
	})
	rest.Go(func() { a.rebootWorker(bctx) })
	rest.Go(func() { a.statusLoop(bctx) })
	rest.Go(func() { a.saveHealthLoop(bctx) })
	rest.Go(func() { a.watchdog(bctx) })
	rest.Go(func() { a.desiredLoop(bctx) })
	a.startControl(bctx, &rest)

	a.log.Info("gwagent running", zap.String("version", info.Version), zap.String("device_id", cfg.Hub.ConnectionString.DeviceID),
		zap.String("installer", cfg.Installer.Type), zap.String("state_dir", cfg.StateDir),
		zap.String("hub_transport", cfg.Hub.Transport), zap.Stringer("hub_proxy", cfg.Hub.Proxy), zap.Stringer("update_proxy", cfg.Update.Proxy))

	var runErr error
	select {
	case <-ctx.Done():
		a.log.Info("stopping")
	case runErr = <-fatal:
		a.log.Error("stopping after a failure", zap.Error(runErr))
	}

	// Graceful stop, bounded by shutdownTimeout: stop intake, let the state
	// machine persist and stop, flush what the queue holds, disconnect.
	a.notify(notifyStopping)
	a.notify("STATUS=stopping")
	deadline := time.Now().Add(cfg.ShutdownTimeout)
	a.session.Drain()
	stopManager()
	if !waitTimeout(&mwg, time.Until(deadline)) {
		a.log.Warn("firmware state machine did not stop in time")
	}
	a.reporter.Close()
	a.flushOnStop(deadline)
	stopBackground()
	stopQueue()
	stopSession()
	if !waitTimeout(&rest, max(time.Until(deadline), 5*time.Second)) {
		a.log.Warn("parts did not stop in time")
	}
	if err := a.queue.Close(); err != nil {
		runErr = errors.Join(runErr, fmt.Errorf("agent: close the queue: %w", err))
	}
	a.log.Info("stopped")
	return runErr
}

// reportStartup queues the start-up report: the agent and the current or
// last update as they are.
func (a *Agent) reportStartup(ctx context.Context, cfg *config.Config, info buildinfo.Info) {
	st := a.manager.Status()
	if !st.Busy {
		st.CurrentVersion = a.currentVersion(ctx, st.CurrentVersion)
	}
	// agent.health is reported while a problem lasts (saveHealthLoop); a
	// start clears what an earlier run left.
	if err := a.reporter.Startup(st, time.Now(), map[string]any{
		"agent": map[string]any{"version": info.Version, "installer": cfg.Installer.Type,
			"startedAt": time.Now().UTC().Format(report.TimeFormat), "health": nil},
	}); err != nil {
		a.log.Error("cannot queue the start-up report", zap.Error(err))
	}
}

// warnStartup says, once at start, what makes updates do less than a person
// would assume: an installer that writes nothing, or required signatures
// with no key to check them against.
func (a *Agent) warnStartup(cfg *config.Config) {
	if a.installerType == "simulated" {
		a.log.Warn("the simulated installer is in use: firmware updates write nothing to the device, yet are reported completed; it is for demos and labs (set installer.type: abpart on a gateway)",
			zap.String("installer", a.installerType))
	}
	if dir := cfg.Signature.KeyDir; !cfg.Signature.AllowUnsigned {
		if _, err := signature.LoadKeys(dir); err != nil {
			a.log.Warn(fmt.Sprintf("no public key to check firmware signatures against in %s (signature.keyDir): every update fails until a minisign key (*.pub) is put there; signatures are required (signature.allowUnsigned is false), so an update without signatureUri is refused (400) and a signed one fails to verify before its download", dir),
				zap.String("key_dir", dir), zap.Error(err))
		}
	}
}

// flushOnStop delivers, until deadline, what the queue holds while the hub
// is there; what it cannot deliver stays on disk for the next start.
func (a *Agent) flushOnStop(deadline time.Time) {
	if !a.session.Health().Connected {
		if n := a.queue.Durable(); n > 0 {
			// Offline: waiting cannot deliver them; the next start will (and
			// re-states the progress, which is not kept).
			a.log.Info("offline: reported state changes kept for the next start", zap.Int("pending", n))
		}
		return
	}
	fctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	if err := a.queue.Flush(fctx); err != nil {
		a.log.Warn("stopping with reported state changes not delivered; they are kept for the next start",
			zap.Int("pending", a.queue.Durable()), zap.Error(err))
	}
}

// currentVersion asks the installer (when it knows) which version runs; the
// state machine asks too, but only once it runs, after the start-up report.
func (a *Agent) currentVersion(ctx context.Context, fallback string) string {
	v, ok := a.installer.(firmware.Versioner)
	if !ok {
		return fallback
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cur, err := v.CurrentVersion(ctx)
	if err != nil || cur == "" {
		return fallback
	}
	return cur
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

func (a *Agent) onConnect() {
	// Start-up garbage (config parsing, TLS set-up, the first twin) would
	// otherwise stay resident until the runtime's forced GC two minutes
	// later; returning it once keeps an idle agent small.
	a.freeOnce.Do(debug.FreeOSMemory)
	a.queue.Wake()
	a.onlineOnce.Do(func() { close(a.online) })
	a.kickStatus()
}

// onDesired hands the desired firmware to the converger (desired.go) and
// the rest to the writable properties.
func (a *Agent) onDesired(d session.Desired) {
	fw, present := d.Doc[desiredKey]
	doc := d.Doc
	if present {
		doc = make(map[string]any, len(d.Doc))
		for k, v := range d.Doc {
			if k != desiredKey {
				doc[k] = v
			}
		}
	}
	a.onDesiredFirmware(fw, present, d.Full, d.Version)
	a.acker.OnDesired(doc, d.Version, d.Full, d.Reported)
}

// healthCheck gates the commit of a trial boot (package health): within
// update.healthTimeout the hub session must be back, the reported patches
// queued so far acknowledged, systemd must report the system running and
// the configured units active — or a person decides with gwagent commit or
// gwagent rollback.
func (a *Agent) healthCheck(ctx context.Context) error {
	return a.health.Check(ctx, a.manager.Status().UpdateID)
}

// onSaveProblem is the queue's OnSaveProblem: the status line and
// agent.health follow.
func (a *Agent) onSaveProblem() {
	a.kickStatus()
	select {
	case a.saveKick <- struct{}{}:
	default:
	}
}

// saveProblemText says why the queue cannot save, for people: the
// directory and the system's reason ("no space left on device"), without
// the names of temporary files.
func saveProblemText(dir string, p *twin.SaveProblem) string {
	cause := p.Err
	var pe *os.PathError
	if errors.As(cause, &pe) {
		cause = pe.Err
	}
	return fmt.Sprintf("cannot save reported state to %s: %v", dir, cause)
}

// queueLine is the status line's part about the queue: empty while it
// saves, else why it cannot.
func (a *Agent) queueLine() string {
	p := a.queue.SaveProblem()
	if p == nil {
		return ""
	}
	s := "; " + saveProblemText(filepath.Join(a.config().StateDir, queueDir), p)
	if p.Unsaved > 0 {
		s += fmt.Sprintf(" (%d held in memory only)", p.Unsaved)
	}
	return s
}

// saveHealthLoop reports agent.health while the queue cannot save to disk,
// and null once it can: the problem is visible on the twin, not only in
// the journal. The report is progress (kept in memory), so it needs no
// disk write to be sent; a start clears it.
func (a *Agent) saveHealthLoop(ctx context.Context) {
	reported := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.saveKick:
		}
		p := a.queue.SaveProblem()
		var health any
		switch {
		case p != nil && !reported:
			health = map[string]any{"queue": map[string]any{
				"error": saveProblemText(filepath.Join(a.config().StateDir, queueDir), p),
				"since": p.Since.UTC().Format(report.TimeFormat),
			}}
		case p == nil && reported:
		default:
			continue
		}
		if err := a.queue.Report(map[string]any{"agent": map[string]any{"health": health}}, false); err != nil {
			a.log.Warn("cannot report agent.health", zap.Error(err))
			continue
		}
		reported = p != nil
	}
}

// adaptiveMinReuse maps update.adaptiveMinReuse onto
// firmware.Config.AdaptiveMinReuse, where 0 means the default and a
// negative share "always assemble".
func adaptiveMinReuse(share float64) float64 {
	if share == 0 {
		return -1
	}
	return share
}
