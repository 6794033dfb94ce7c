package hub

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/iothub"
)

// Defaults of Config.
const (
	DefaultHostName     = "localhost"
	DefaultMQTTAddr     = ":8883"
	DefaultHTTPSAddr    = ":443"
	DefaultKeepAliveCap = 1767 * time.Second
	// ServicePolicy is the shared access policy of the service connection
	// string the hub creates. It has every permission, like IoT Hub's.
	ServicePolicy = "iothubowner"
	// WebSocketPath is where MQTT over WebSocket is served.
	WebSocketPath = "/$iothub/websocket"
)

// ServiceConnectionStringFile is the file in the state directory that holds
// the service connection string (mode 0600).
const ServiceConnectionStringFile = "service-connection-string"

// Sentinel errors of the Go API.
var (
	ErrDeviceExists   = errors.New("hub: device already exists")
	ErrDeviceNotFound = errors.New("hub: device not found")
	ErrClosed         = errors.New("hub: closed")
)

// Config configures a Hub. Only StateDir is required.
type Config struct {
	// StateDir holds the registry, the twins, the CA, the server
	// certificate and the service connection string. Created if missing.
	StateDir string
	// HostName is the hub's name: it is what devices put in their MQTT
	// username and SAS tokens, what the service puts in its SAS tokens,
	// the HostName of the connection strings and a name in the server
	// certificate. Default "localhost".
	HostName string
	// MQTTAddr is the MQTT-over-TLS listen address. Default ":8883"; use
	// "127.0.0.1:0" in tests and read MQTTAddr() afterwards.
	MQTTAddr string
	// HTTPSAddr is the service REST API listen address. Default ":443".
	HTTPSAddr string
	// WebSocket enables MQTT over WebSocket at WebSocketPath (subprotocol
	// "mqtt"), on the HTTPS listener unless WSAddr is set.
	WebSocket bool
	// WSAddr, if set with WebSocket, serves MQTT over WebSocket on its own
	// TLS listener instead of the HTTPS one.
	WSAddr string
	// FilesDir, if set, is served read-only at https://host/files/ (no
	// authentication, Range requests supported), the way a storage
	// account holds firmware images: regular files inside it only (no
	// symlink out of it), no directory listings, no dotfiles.
	FilesDir string
	// TLSCertFile and TLSKeyFile replace the hub's own CA-signed server
	// certificate.
	TLSCertFile, TLSKeyFile string
	// KeepAliveCap caps the keep-alive a device may ask for: the hub drops a
	// connection after 1.5 × keep-alive without traffic, and never waits
	// longer than KeepAliveCap. Default 1767 s, IoT Hub's figure.
	KeepAliveCap time.Duration
	// ConnectTimeout bounds how long a new connection may take to become a
	// device: TLS handshake and CONNECT, with the upgrade request for MQTT
	// over WebSocket. On the HTTPS listener it bounds the handshake and the
	// headers of each request. Default 20 s.
	ConnectTimeout time.Duration
	// ReadTimeout bounds reading one service request, headers and body.
	// Default 1 min.
	ReadTimeout time.Duration
	// MaxPreAuthConns and MaxPreAuthConnsPerIP cap the connections that
	// have not authenticated yet (MQTT before its CONNECT is accepted,
	// HTTPS before its first request), in all and per remote IP address.
	// A connection over a cap is closed at once. Defaults 1024 and 64.
	MaxPreAuthConns, MaxPreAuthConnsPerIP int
	// Log receives the hub's logs. Default: no logging.
	Log *zap.Logger
	// OnReported, if set, is called with every accepted reported-properties
	// patch, in order per device, after it is stored and before the device
	// gets its 204. It must not block for long; it runs on the device's
	// request goroutine.
	OnReported func(ReportedPatch)
	// JobDeviceRate is how many device operations per second a job starts
	// (method calls or twin updates). Default DefaultJobDeviceRate.
	JobDeviceRate float64
	// TwinWriteRate, if positive, throttles service-side twin writes (PATCH
	// and PUT of /twins/{id}, and jobs' twin updates) to this many per
	// second, as IoT Hub's twin-update throttle does (S1: 50/s per unit):
	// a REST write over it is answered 429 ThrottlingException (429001)
	// with Retry-After, a job's write waits. 0 means no throttle.
	TwinWriteRate float64
}

// ReportedPatch is an accepted reported-properties patch.
type ReportedPatch struct {
	DeviceID string
	Patch    map[string]any // as the device sent it; numbers are json.Number
	Version  int64          // the reported $version after the patch
}

// Hub is a local IoT hub: an MQTT broker that speaks IoT Hub's device
// protocol, a device registry with twins, and IoT Hub's service REST API.
type Hub struct {
	// brokerLogOff silences the broker's logger from Close on (set before
	// the broker stops, read by its goroutines).
	brokerLogOff atomic.Bool

	cfg     Config
	log     *zap.Logger
	store   *store
	tls     *tlsMaterial
	service iothub.ConnectionString
	svcKey  []byte
	dps     *dpsServer // the DPS side (dps.go)
	jobs    *jobs      // jobs v2 (jobs.go)

	throttle *twinThrottle // service-side twin writes (throttle.go)

	gate    *gate // unauthenticated connections, capped
	broker  *mqtt.Server
	mqttLn  *tlsListener
	wsLn    *wsListener // nil unless WebSocket
	httpSrv *http.Server
	httpLn  net.Listener
	wsSrv   *http.Server // own WebSocket listener (WSAddr); nil otherwise
	wsNetLn net.Listener

	ctx    context.Context // cancelled by Close; bounds every wait of the hub
	cancel context.CancelFunc

	sessMu      sync.Mutex          // guards sessions, conns, sessChanged
	sessions    map[string]*session // live connection per device id
	conns       map[*mqtt.Client]*session
	sessChanged chan struct{} // closed and replaced whenever a session starts, ends or subscribes

	pendMu  sync.Mutex // guards pending
	pending map[string]*pendingCall
	ridSeq  atomic.Uint64

	faultMu sync.Mutex // guards faults
	faults  map[string][]*TwinFault

	obsMu sync.Mutex // serialises Config.OnReported calls

	wg        sync.WaitGroup // session workers and server goroutines
	startOnce sync.Once
	started   atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// New checks cfg and loads (or, on first start, creates) the state in
// cfg.StateDir. It does not listen yet: call Start or Run.
func New(cfg Config) (*Hub, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("hub: StateDir is required")
	}
	if cfg.HostName == "" {
		cfg.HostName = DefaultHostName
	}
	if cfg.MQTTAddr == "" {
		cfg.MQTTAddr = DefaultMQTTAddr
	}
	if cfg.HTTPSAddr == "" {
		cfg.HTTPSAddr = DefaultHTTPSAddr
	}
	if cfg.KeepAliveCap <= 0 {
		cfg.KeepAliveCap = DefaultKeepAliveCap
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = DefaultReadTimeout
	}
	if cfg.MaxPreAuthConns <= 0 {
		cfg.MaxPreAuthConns = DefaultMaxPreAuthConns
	}
	if cfg.MaxPreAuthConnsPerIP <= 0 {
		cfg.MaxPreAuthConnsPerIP = DefaultMaxPreAuthConnsPerIP
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.JobDeviceRate <= 0 {
		cfg.JobDeviceRate = DefaultJobDeviceRate
	}
	if cfg.TwinWriteRate < 0 {
		return nil, fmt.Errorf("hub: TwinWriteRate %v must not be negative", cfg.TwinWriteRate)
	}
	if strings.ContainsAny(cfg.HostName, "/;= ") {
		return nil, fmt.Errorf("hub: HostName %q is not a host name", cfg.HostName)
	}
	if cfg.FilesDir != "" {
		st, err := os.Stat(cfg.FilesDir)
		if err != nil {
			return nil, fmt.Errorf("hub: files directory: %w", err)
		}
		if !st.IsDir() {
			return nil, fmt.Errorf("hub: files directory %s is not a directory", cfg.FilesDir)
		}
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("hub: create state directory: %w", err)
	}
	h := &Hub{
		cfg:         cfg,
		log:         cfg.Log,
		sessions:    map[string]*session{},
		conns:       map[*mqtt.Client]*session{},
		sessChanged: make(chan struct{}),
		pending:     map[string]*pendingCall{},
		faults:      map[string][]*TwinFault{},
		throttle:    newTwinThrottle(cfg.TwinWriteRate),
		gate:        newGate(cfg.MaxPreAuthConns, cfg.MaxPreAuthConnsPerIP, cfg.Log.Named("conns")),
	}
	h.ctx, h.cancel = context.WithCancel(context.Background())
	var err error
	if h.tls, err = loadTLS(cfg.StateDir, cfg.HostName, cfg.TLSCertFile, cfg.TLSKeyFile, time.Now()); err != nil {
		return nil, err
	}
	if h.store, err = openStore(cfg.StateDir); err != nil {
		return nil, err
	}
	if err := h.loadServiceConnectionString(); err != nil {
		return nil, err
	}
	if h.dps, err = openDPS(cfg.StateDir, cfg.HostName); err != nil {
		return nil, err
	}
	if h.jobs, err = openJobs(cfg.StateDir, cfg.JobDeviceRate); err != nil {
		return nil, err
	}
	return h, nil
}

// loadServiceConnectionString reads the service connection string or, on
// first start, creates one with a random key. A changed HostName keeps the
// key and rewrites the host.
func (h *Hub) loadServiceConnectionString() error {
	path := filepath.Join(h.cfg.StateDir, ServiceConnectionStringFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		cs, perr := iothub.ParseConnectionString(strings.TrimSpace(string(b)))
		if perr != nil || !cs.IsService() {
			return fmt.Errorf("hub: %s does not hold a service connection string: %v", path, perr)
		}
		h.service = cs
	case errors.Is(err, fs.ErrNotExist):
		h.service = iothub.ConnectionString{SharedAccessKeyName: ServicePolicy, SharedAccessKey: newKey()}
	default:
		return fmt.Errorf("hub: read %s: %w", path, err)
	}
	if h.service.HostName != h.cfg.HostName || err != nil {
		h.service.HostName = h.cfg.HostName
		data := []byte(h.service.String() + "\n")
		if werr := atomicfile.WriteFile(path, data, 0o600); werr != nil {
			return fmt.Errorf("hub: write %s: %w", path, werr)
		}
	}
	h.svcKey, err = h.service.Key()
	return err
}

// newKey returns a random 256-bit key in base64, the size IoT Hub uses.
func newKey() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

// Start binds the listeners and serves until ctx is done or Close is
// called. It returns once the hub accepts connections.
func (h *Hub) Start(ctx context.Context) error {
	err := ErrClosed
	h.startOnce.Do(func() { err = h.start() })
	if err != nil {
		return err
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		select {
		case <-ctx.Done():
			go func() { _ = h.Close() }() // Close waits for this goroutine
		case <-h.ctx.Done():
		}
	}()
	return nil
}

// Run starts the hub and serves until ctx is done, then shuts it down. A
// cancelled ctx is a normal stop and returns nil.
func (h *Hub) Run(ctx context.Context) error {
	if err := h.Start(ctx); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case <-h.ctx.Done():
	}
	return h.Close()
}

func (h *Hub) start() (err error) {
	if h.ctx.Err() != nil {
		return ErrClosed
	}
	serverTLS := h.serverTLSConfig()
	h.broker = mqtt.New(&mqtt.Options{
		Capabilities: brokerCapabilities(),
		Logger:       newSlogLogger(h.log.Named("broker"), &h.brokerLogOff),
		// $SYS topics are of no use to devices that may not subscribe to
		// them; publish them rarely.
		SysTopicResendInterval: 3600,
	})
	if err := h.broker.AddHook(&hook{h: h}, nil); err != nil {
		return fmt.Errorf("hub: add broker hook: %w", err)
	}
	h.mqttLn = newTLSListener("mqtts", h.cfg.MQTTAddr, serverTLS, h.cfg.ConnectTimeout, h.gate, h.log.Named("mqtts"))
	if err := h.broker.AddListener(h.mqttLn); err != nil {
		return fmt.Errorf("hub: listen MQTT on %s: %w", h.cfg.MQTTAddr, err)
	}
	defer func() {
		if err != nil {
			_ = h.broker.Close()
		}
	}()
	if h.cfg.WebSocket {
		h.wsLn = newWSListener("wss")
		if err := h.broker.AddListener(h.wsLn); err != nil {
			return fmt.Errorf("hub: add WebSocket listener: %w", err)
		}
	}

	h.httpLn, err = tls.Listen("tcp", h.cfg.HTTPSAddr, serverTLS)
	if err != nil {
		return fmt.Errorf("hub: listen HTTPS on %s: %w", h.cfg.HTTPSAddr, err)
	}
	h.httpSrv = h.newHTTPServer(h.routes(h.cfg.WebSocket && h.cfg.WSAddr == ""), "https")
	if h.cfg.WebSocket && h.cfg.WSAddr != "" {
		h.wsNetLn, err = tls.Listen("tcp", h.cfg.WSAddr, serverTLS)
		if err != nil {
			_ = h.httpLn.Close()
			return fmt.Errorf("hub: listen WebSocket on %s: %w", h.cfg.WSAddr, err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("GET "+WebSocketPath, h.serveWebSocket)
		h.wsSrv = h.newHTTPServer(mux, "wss")
	}

	if err := h.broker.Serve(); err != nil {
		_ = h.httpLn.Close()
		if h.wsNetLn != nil {
			_ = h.wsNetLn.Close()
		}
		return fmt.Errorf("hub: start broker: %w", err)
	}
	h.serveHTTP(h.httpSrv, h.httpLn)
	if h.wsSrv != nil {
		h.serveHTTP(h.wsSrv, h.wsNetLn)
	}
	h.started.Store(true)
	h.resumeJobs()
	h.log.Info("hub started",
		zap.String("host", h.cfg.HostName),
		zap.String("mqtt_addr", h.MQTTAddr()),
		zap.String("https_addr", h.HTTPSAddr()),
		zap.Int("devices", h.store.len()))
	return nil
}

// newHTTPServer bounds what a client can hold: the handshake and headers
// by ConnectTimeout, a whole request by ReadTimeout, an idle connection by
// two minutes, and a connection that has sent no request yet takes a place
// in the gate. No WriteTimeout: a firmware download may take long, and a
// method call waits for the device.
func (h *Hub) newHTTPServer(handler http.Handler, name string) *http.Server {
	var held sync.Map // net.Conn → func() that gives its place back
	return &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: h.cfg.ConnectTimeout,
		ReadTimeout:       h.cfg.ReadTimeout,
		IdleTimeout:       2 * time.Minute,
		BaseContext:       func(net.Listener) context.Context { return h.ctx },
		ErrorLog:          zap.NewStdLog(h.log.Named(name)),
		ConnState: func(c net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				// Runs on the accept loop, before the connection is read.
				if release, ok := h.gate.admit(c.RemoteAddr()); ok {
					held.Store(c, release)
				} else {
					_ = c.Close()
				}
			case http.StateActive, http.StateHijacked, http.StateClosed:
				if release, ok := held.LoadAndDelete(c); ok {
					release.(func())()
				}
			}
		},
	}
}

func (h *Hub) serveHTTP(srv *http.Server, ln net.Listener) {
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			h.log.Error("HTTPS server stopped", zap.Error(err))
		}
	}()
}

func (h *Hub) serverTLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{h.tls.cert},
		// Devices may authenticate with a self-signed certificate checked by
		// thumbprint, so any client certificate is accepted here and the
		// CONNECT handler decides.
		ClientAuth: tls.RequestClientCert,
		NextProtos: []string{"h2", "http/1.1"},
	}
}

// Close stops the hub: listeners close, devices are disconnected, pending
// method calls end, and every goroutine the hub started has returned when it
// returns. Calling it again returns the first result.
func (h *Hub) Close() error {
	h.closeOnce.Do(func() {
		h.cancel()
		if !h.started.Load() {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var errs []error
		if err := h.httpSrv.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("hub: stop HTTPS: %w", err))
		}
		if h.wsSrv != nil {
			if err := h.wsSrv.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("hub: stop WebSocket: %w", err))
			}
		}
		// Closes the listeners and every client, and waits for the
		// clients' goroutines, but not for its event loop, which still
		// logs once after this returns.
		h.brokerLogOff.Store(true)
		if err := h.broker.Close(); err != nil {
			errs = append(errs, fmt.Errorf("hub: stop broker: %w", err))
		}
		h.wg.Wait()
		h.closeErr = errors.Join(errs...)
		st := h.throttle.stats()
		h.log.Info("hub stopped", zap.Int64("twin_writes", st.Writes), zap.Int64("twin_writes_throttled", st.Throttled),
			zap.Int64("twin_writes_peak_per_s", st.Peak), zap.Float64("twin_write_rate", st.Rate()),
			zap.Float64("twin_write_limit", st.Limit))
	})
	return h.closeErr
}

// MQTTAddr is the address the MQTT-over-TLS listener is bound to.
func (h *Hub) MQTTAddr() string {
	if h.mqttLn == nil {
		return h.cfg.MQTTAddr
	}
	return h.mqttLn.Address()
}

// HTTPSAddr is the address the service REST API is bound to.
func (h *Hub) HTTPSAddr() string {
	if h.httpLn == nil {
		return h.cfg.HTTPSAddr
	}
	return h.httpLn.Addr().String()
}

// WebSocketURL is the MQTT-over-WebSocket URL (with the bound address
// instead of the host name), or "" when WebSocket is off.
func (h *Hub) WebSocketURL() string {
	switch {
	case !h.cfg.WebSocket:
		return ""
	case h.wsNetLn != nil:
		return "wss://" + h.wsNetLn.Addr().String() + WebSocketPath
	default:
		return "wss://" + h.HTTPSAddr() + WebSocketPath
	}
}

// HostName is the hub's host name (Config.HostName).
func (h *Hub) HostName() string { return h.cfg.HostName }

// ServiceConnectionString is the iothubowner connection string for the
// service REST API.
func (h *Hub) ServiceConnectionString() string { return h.service.String() }

// ServiceConnectionStringFile is the path of the file holding
// ServiceConnectionString.
func (h *Hub) ServiceConnectionStringFile() string {
	return filepath.Join(h.cfg.StateDir, ServiceConnectionStringFile)
}

// CAFile is the PEM file of the CA that clients must trust, or "" when the
// hub serves a certificate given in Config.
func (h *Hub) CAFile() string { return h.tls.caFile }

// RootCAs is a pool holding the hub's CA, for clients in the same process;
// nil when the hub serves a certificate given in Config.
func (h *Hub) RootCAs() *x509.CertPool { return h.tls.pool }
