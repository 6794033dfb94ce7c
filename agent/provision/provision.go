// Package provision registers the gateway with the Device Provisioning
// Service (DPS) over MQTT and keeps the assignment it gets in the state
// directory, so that a gateway built from one factory image finds its hub
// and its own identity on first start.
//
// It owns the device side of the DPS exchange and the assignment file; the
// wire shapes are iothub/dps's, and when to provision is the agent's call.
package provision

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/session"
	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
)

// AssignmentFile is the file in the state directory that holds the
// assignment (mode 0600: it holds the device key).
const AssignmentFile = "provisioning.json"

const assignmentFormat = 1

// Errors of a registration. ErrRefused and ErrDisabled are not cured by
// retrying soon: the configuration or the enrollment must change.
var (
	ErrRefused  = errors.New("provision: DPS refused the connection (wrong key, unknown id scope or registration id, or no enrollment)")
	ErrDisabled = errors.New("provision: the enrollment is disabled")
	ErrFailed   = errors.New("provision: the registration failed")
)

// Config says how to register.
type Config struct {
	IDScope        string
	GlobalEndpoint string // the DPS host name TLS verifies; default dps.DefaultGlobalEndpoint
	Address        string // host:port to dial; default GlobalEndpoint:8883
	// Transport is how to reach DPS, as hub.transport says: mqtt (8883,
	// the default), websocket (wss://GlobalEndpoint:443/$iothub/websocket)
	// or auto (8883, then the WebSocket when 8883 cannot be reached).
	Transport string
	// WebSocketAddress is the host:port the WebSocket dials; default
	// GlobalEndpoint:443.
	WebSocketAddress string
	// Proxy returns the HTTP proxy for a "host:port" target, or nil.
	Proxy          func(target string) (*url.URL, error)
	RegistrationID string
	// Key is the device's symmetric key (derived already for a group).
	Key []byte
	// Certificate is the device certificate of X.509 attestation, used
	// instead of Key: TLS client authentication, no SAS token.
	Certificate *tls.Certificate
	// Payload is the custom payload sent with the registration (JSON
	// object); ModelID is added to it as "modelId".
	Payload json.RawMessage
	ModelID string
	RootCAs *x509.CertPool
	// Timeout bounds one whole registration. Default 2 min.
	Timeout    time.Duration
	ClientType string
	Log        *zap.Logger
}

// Assignment is what DPS assigned.
type Assignment struct {
	Format         int    `json:"format"`
	IDScope        string `json:"idScope"`
	RegistrationID string `json:"registrationId"`
	AssignedHub    string `json:"assignedHub"`
	DeviceID       string `json:"deviceId"`
	Key            string `json:"key,omitempty"` // base64 device key; empty for X.509
	// X509 says the device authenticates with its certificate
	// (provisioning.x509), to DPS and to the hub alike.
	X509          bool      `json:"x509,omitempty"`
	Substatus     string    `json:"substatus,omitempty"`
	ProvisionedAt time.Time `json:"provisionedAt"`
}

// ConnectionString is the device connection string of the assignment.
func (a Assignment) ConnectionString() iothub.ConnectionString {
	if a.X509 {
		return iothub.ConnectionString{HostName: a.AssignedHub, DeviceID: a.DeviceID, X509: true}
	}
	return iothub.ConnectionString{HostName: a.AssignedHub, DeviceID: a.DeviceID, SharedAccessKey: a.Key}
}

// Load reads the assignment kept in stateDir; ok is false when there is
// none (an empty file is a write that never completed).
func Load(stateDir string) (Assignment, bool, error) {
	path := filepath.Join(stateDir, AssignmentFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) || err == nil && len(strings.TrimSpace(string(b))) == 0 {
		return Assignment{}, false, nil
	}
	if err != nil {
		return Assignment{}, false, fmt.Errorf("provision: %w", err)
	}
	var a Assignment
	if err := json.Unmarshal(b, &a); err != nil {
		return Assignment{}, false, fmt.Errorf("provision: %s: %w", path, err)
	}
	if a.Format != assignmentFormat || a.AssignedHub == "" || a.DeviceID == "" || a.Key == "" && !a.X509 {
		return Assignment{}, false, fmt.Errorf("provision: %s is not an assignment of format %d", path, assignmentFormat)
	}
	return a, true, nil
}

// Save keeps the assignment in stateDir (0600, atomically).
func Save(stateDir string, a Assignment) error {
	a.Format = assignmentFormat
	b, err := json.MarshalIndent(a, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(stateDir, AssignmentFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("provision: save assignment: %w", err)
	}
	return nil
}

// payload is the registration body.
func (c Config) body() ([]byte, error) {
	req := dps.RegistrationRequest{RegistrationID: c.RegistrationID}
	p := map[string]any{}
	if len(c.Payload) > 0 {
		if err := json.Unmarshal(c.Payload, &p); err != nil {
			return nil, fmt.Errorf("provision: payload is not a JSON object: %w", err)
		}
	}
	if c.ModelID != "" {
		p["modelId"] = c.ModelID
	}
	if len(p) > 0 {
		b, err := json.Marshal(p)
		if err != nil {
			return nil, err
		}
		req.Payload = b
	}
	return json.Marshal(req)
}

type response struct {
	topic dps.Response
	body  []byte
}

// Register runs one registration: connect, register, poll the operation
// until DPS answers with its outcome. It returns the assignment or an
// error that names the cause (a *dps.Error for an error answer).
func Register(ctx context.Context, c Config) (Assignment, error) {
	if c.GlobalEndpoint == "" {
		c.GlobalEndpoint = dps.DefaultGlobalEndpoint
	}
	if c.Address == "" {
		c.Address = net.JoinHostPort(c.GlobalEndpoint, "8883")
	}
	if c.WebSocketAddress == "" {
		c.WebSocketAddress = net.JoinHostPort(c.GlobalEndpoint, session.DefaultWebSocketPort)
	}
	if c.Timeout <= 0 {
		c.Timeout = 2 * time.Minute
	}
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
	if c.IDScope == "" || c.RegistrationID == "" || len(c.Key) == 0 && c.Certificate == nil {
		return Assignment{}, errors.New("provision: id scope, registration id and a key or certificate are required")
	}
	body, err := c.body()
	if err != nil {
		return Assignment{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	transports := []string{session.TransportMQTT}
	switch c.Transport {
	case session.TransportWebSocket:
		transports = []string{session.TransportWebSocket}
	case session.TransportAuto:
		transports = []string{session.TransportMQTT, session.TransportWebSocket}
	}
	for i, tr := range transports {
		var a Assignment
		var unreachable bool
		a, unreachable, err = c.registerOver(ctx, tr, body)
		if err == nil || !unreachable || i == len(transports)-1 || ctx.Err() != nil {
			return a, err
		}
		c.Log.Warn("DPS unreachable on 8883; trying MQTT over WebSocket on 443", zap.Error(err))
	}
	return Assignment{}, err
}

// registerOver is Register over one transport. unreachable says the
// connection itself failed (a network error, not DPS's refusal), which is
// when auto tries the next transport.
func (c Config) registerOver(ctx context.Context, tr string, body []byte) (Assignment, bool, error) {
	addr, broker := c.Address, "tls://"+c.Address
	if tr == session.TransportWebSocket {
		addr, broker = c.WebSocketAddress, "wss://"+net.JoinHostPort(c.GlobalEndpoint, session.DefaultWebSocketPort)+session.WebSocketPath
	}
	msgs := make(chan response, 8)
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.GlobalEndpoint, RootCAs: c.RootCAs}
	pw := ""
	if c.Certificate != nil {
		tlsCfg.Certificates = []tls.Certificate{*c.Certificate} // X.509: no password
	} else {
		pw = iothub.NewSAS(dps.Resource(c.IDScope, c.RegistrationID), c.Key, dps.RegistrationKeyName, time.Now().Add(time.Hour))
	}
	opts := mqtt.NewClientOptions().
		AddBroker(broker).
		SetCustomOpenConnectionFn(func(u *url.URL, o mqtt.ClientOptions) (net.Conn, error) {
			dctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
			defer cancel()
			if tr == session.TransportWebSocket {
				return session.DialWebSocket(dctx, u.String(), addr, o.TLSConfig, c.Proxy)
			}
			return session.DialTLS(dctx, addr, o.TLSConfig, c.Proxy)
		}).
		SetClientID(c.RegistrationID).
		SetUsername(dps.Username(c.IDScope, c.RegistrationID, c.ClientType)).
		SetPassword(pw).
		SetTLSConfig(tlsCfg).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(30 * time.Second).
		SetWriteTimeout(30 * time.Second).
		SetKeepAlive(60 * time.Second).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) {
			r, err := dps.ParseResponseTopic(m.Topic())
			if err != nil {
				return
			}
			select {
			case msgs <- response{topic: r, body: m.Payload()}:
			default: // only one request is ever in flight
			}
		})
	client := mqtt.NewClient(opts)
	tok := client.Connect()
	if err := wait(ctx, tok); err != nil {
		if ct, ok := tok.(*mqtt.ConnectToken); ok && (ct.ReturnCode() == 0x04 || ct.ReturnCode() == 0x05 || ct.ReturnCode() == 0x02) {
			return Assignment{}, false, fmt.Errorf("%w: connect to %s: %v", ErrRefused, addr, err)
		}
		return Assignment{}, true, fmt.Errorf("provision: connect to DPS at %s (%s): %w", addr, tr, err)
	}
	defer client.Disconnect(250)
	if err := wait(ctx, client.Subscribe(dps.ResponseFilter, 1, nil)); err != nil {
		return Assignment{}, false, fmt.Errorf("provision: subscribe: %w", err)
	}

	rid := 0
	request := func(topic string, payload []byte) (response, error) {
		if err := wait(ctx, client.Publish(topic, 1, false, payload)); err != nil {
			return response{}, fmt.Errorf("provision: publish: %w", err)
		}
		want := strconv.Itoa(rid)
		for {
			select {
			case r := <-msgs:
				if r.topic.RID != want {
					continue
				}
				if r.topic.Status >= 300 {
					var e dps.Error
					if json.Unmarshal(r.body, &e) != nil || e.ErrorCode == 0 {
						e = dps.Error{ErrorCode: r.topic.Status * 1000, Message: strings.TrimSpace(string(r.body))}
					}
					return r, &e
				}
				return r, nil
			case <-ctx.Done():
				return response{}, fmt.Errorf("provision: no answer from DPS: %w", ctx.Err())
			}
		}
	}
	rid++
	r, err := request(dps.RegisterTopic(strconv.Itoa(rid)), body)
	for {
		if err != nil {
			var de *dps.Error
			if errors.As(err, &de) && de.Status() == 429 {
				// Throttled: wait as told (or a few seconds) and ask again.
				if werr := sleep(ctx, max(r.topic.RetryAfter, 3*time.Second)); werr != nil {
					return Assignment{}, false, err
				}
				rid++
				r, err = request(dps.RegisterTopic(strconv.Itoa(rid)), body)
				continue
			}
			return Assignment{}, false, fmt.Errorf("provision: DPS answered: %w", err)
		}
		var res dps.OperationResult
		if err := json.Unmarshal(r.body, &res); err != nil {
			return Assignment{}, false, fmt.Errorf("provision: DPS answer is not valid: %w", err)
		}
		switch res.Status {
		case dps.StatusAssigned:
			st := res.RegistrationState
			if st == nil || st.AssignedHub == "" || st.DeviceID == "" {
				return Assignment{}, false, fmt.Errorf("%w: assigned without a hub or device id", ErrFailed)
			}
			c.Log.Info("provisioned", zap.String("assigned_hub", st.AssignedHub), zap.String("device_id", st.DeviceID),
				zap.String("substatus", st.Substatus))
			return Assignment{
				IDScope: c.IDScope, RegistrationID: c.RegistrationID, AssignedHub: st.AssignedHub, DeviceID: st.DeviceID,
				Key: base64.StdEncoding.EncodeToString(c.Key), X509: c.Certificate != nil, Substatus: st.Substatus, ProvisionedAt: time.Now().UTC(),
			}, false, nil
		case dps.StatusDisabled:
			return Assignment{}, false, ErrDisabled
		case dps.StatusFailed, dps.StatusUnassigned:
			msg := ""
			if st := res.RegistrationState; st != nil {
				msg = fmt.Sprintf(": %d %s", st.ErrorCode, st.ErrorMessage)
			}
			return Assignment{}, false, fmt.Errorf("%w (status %s)%s", ErrFailed, res.Status, msg)
		}
		if res.OperationID == "" {
			return Assignment{}, false, fmt.Errorf("provision: DPS answered status %q without an operation id", res.Status)
		}
		if err := sleep(ctx, max(r.topic.RetryAfter, time.Second)); err != nil {
			return Assignment{}, false, fmt.Errorf("provision: still %s: %w", res.Status, err)
		}
		rid++
		r, err = request(dps.StatusTopic(strconv.Itoa(rid), res.OperationID), []byte(" "))
	}
}

func wait(ctx context.Context, tok mqtt.Token) error {
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
