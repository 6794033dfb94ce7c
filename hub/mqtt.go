package hub

import (
	"bytes"
	"crypto/sha1" //nolint:gosec // IoT Hub identifies X.509 devices by SHA-1 thumbprint
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
)

// maxSubscriptions is how many topic filters a device may hold at once.
const maxSubscriptions = 5

// maxPacketSize bounds one MQTT packet: IoT Hub's largest message (256 KB
// telemetry) plus room for the topic.
const maxPacketSize = 256*1024 + 4096

// Reasons a connection is closed by the hub.
var (
	errTakenOver       = errors.New("hub: 400027 ConnectionForcefullyClosedOnNewConnection")
	errTokenExpired    = errors.New("hub: 401003 SAS token expired")
	errKicked          = errors.New("hub: connection closed by the hub")
	errForbiddenTopic  = errors.New("hub: publish to a topic the device may not use")
	errQoS2            = errors.New("hub: QoS 2 is not supported")
	errProtocolVersion = errors.New("hub: only MQTT 3.1.1 is supported")
	errClientID        = errors.New("hub: CONNECT without a client identifier")
	errBadConnect      = errors.New("hub: malformed CONNECT")
	errDeviceRemoved   = errors.New("hub: device identity changed or removed")
)

func brokerCapabilities() *mqtt.Capabilities {
	c := mqtt.NewDefaultServerCapabilities()
	c.MinimumProtocolVersion = 4
	c.MaximumQos = 1 // a QoS 2 subscription is granted QoS 1
	c.RetainAvailable = 0
	c.MaximumPacketSize = maxPacketSize
	// The hub writes to devices directly, never through the broker's
	// per-client queue; a small queue keeps a connected device cheap.
	c.MaximumClientWritesPending = 16
	c.MaximumInflight = 64
	return c
}

// session is one live, authenticated device connection.
type session struct {
	id   string
	cl   *mqtt.Client
	work chan twinRequest // twin requests, handled in order by one goroutine
	done chan struct{}    // closed when the connection has ended
	exp  *time.Timer      // drops the connection when its SAS token expires; nil for X.509
}

func (s *session) subscribed(filter string) bool {
	_, ok := s.cl.State.Subscriptions.Get(filter)
	return ok
}

// hook plugs IoT Hub's device protocol into the broker.
type hook struct {
	mqtt.HookBase
	h *Hub
}

func (k *hook) ID() string { return "iothub" }

func (k *hook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnSessionEstablished, mqtt.OnDisconnect,
		mqtt.OnACLCheck, mqtt.OnPacketRead, mqtt.OnPublish, mqtt.OnPublished,
		mqtt.OnSubscribed, mqtt.OnUnsubscribed:
		return true
	}
	return false
}

// OnConnect authenticates the device as IoT Hub does and answers a refusal
// itself, so that the CONNACK carries IoT Hub's return codes.
func (k *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	h := k.h
	if isDPSConnect(pk) {
		return h.dpsConnect(cl, pk)
	}
	code, err := h.authenticate(cl, pk, time.Now())
	if err != nil {
		h.log.Info("device refused", zap.String("device_id", cl.ID), zap.String("remote", cl.Net.Remote),
			zap.Uint8("connack", code.Code), zap.Error(err))
		_ = h.broker.SendConnack(cl, code, false, nil)
		return err
	}
	h.recordModelID(cl.ID, string(pk.Connect.Username))
	// Wills are allowed only on the telemetry topic and the hub routes no
	// telemetry, so a will is dropped.
	cl.Properties.Will = mqtt.Will{}
	cl.State.Keepalive = h.keepAlive(pk.Connect.Keepalive)
	if c, ok := cl.Net.Conn.(authenticated); ok {
		c.authenticated()
	}

	// The newer connection wins; the older one is closed before the broker
	// takes its session over, so it never sees a DISCONNECT packet (which
	// MQTT 3.1.1 does not allow a server to send).
	h.sessMu.Lock()
	old := h.sessions[cl.ID]
	h.sessMu.Unlock()
	if old != nil {
		h.log.Info("device reconnected, closing the older connection", zap.String("device_id", cl.ID))
		old.cl.Stop(errTakenOver)
	}
	return nil
}

// recordModelID keeps the model id a device names in its username
// (&model-id=…) as its twin's modelId, as IoT Hub does for IoT Plug and
// Play devices; a connect that names none leaves it as it was.
func (h *Hub) recordModelID(deviceID, username string) {
	info, err := iothub.ParseUsername(username)
	if err != nil || info.Props["model-id"] == "" {
		return
	}
	d := h.store.get(deviceID)
	if d == nil {
		return
	}
	model := info.Props["model-id"]
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.deleted || d.rec.ModelID == model {
		return
	}
	d.rec.ModelID = model
	if err := d.save(); err != nil {
		h.log.Warn("model id not saved", zap.String("device_id", deviceID), zap.Error(err))
		return
	}
	h.log.Info("device announced its model", zap.String("device_id", deviceID), zap.String("model_id", model))
}

// keepAlive is the keep-alive the hub enforces (the broker drops a client
// after 1.5 × keep-alive without a packet): what the device asked for,
// capped so that the wait never exceeds KeepAliveCap. A device that asks for
// none gets the cap, as behind IoT Hub's load balancer.
func (h *Hub) keepAlive(asked uint16) uint16 {
	capSecs := uint16(min(math.Floor(h.cfg.KeepAliveCap.Seconds()/1.5), math.MaxUint16))
	if capSecs == 0 {
		capSecs = 1
	}
	if asked == 0 || asked > capSecs {
		return capSecs
	}
	return asked
}

// OnConnectAuthenticate always agrees: OnConnect has already decided.
func (k *hook) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

func notAuthorized(format string, args ...any) (packets.Code, error) {
	return packets.Err3NotAuthorized, fmt.Errorf("hub: "+format, args...)
}

// authenticate checks a CONNECT as IoT Hub does (§1.2–1.6): username, client
// id, identity, and a SAS token or an X.509 client certificate. It returns
// the CONNACK code for a refusal.
func (h *Hub) authenticate(cl *mqtt.Client, pk packets.Packet, now time.Time) (packets.Code, error) {
	info, err := iothub.ParseUsername(string(pk.Connect.Username))
	if err != nil {
		return notAuthorized("%v", err)
	}
	if !strings.EqualFold(info.Host, h.cfg.HostName) {
		return notAuthorized("username names host %q, this hub is %q", info.Host, h.cfg.HostName)
	}
	if info.ModuleID != "" {
		return notAuthorized("module identities are not supported")
	}
	if cl.ID != info.DeviceID {
		return notAuthorized("client id %q does not match the username's device %q", cl.ID, info.DeviceID)
	}
	d := h.store.get(info.DeviceID)
	if d == nil {
		return notAuthorized("device %q is not registered", info.DeviceID)
	}
	d.mu.Lock()
	auth, status, deleted := d.rec.Auth, d.rec.Status, d.deleted
	d.mu.Unlock()
	if deleted {
		return notAuthorized("device %q is not registered", info.DeviceID)
	}
	if status != "enabled" {
		return packets.Err3ServerUnavailable, fmt.Errorf("hub: device %q is disabled", info.DeviceID)
	}
	if pk.Connect.PasswordFlag && len(pk.Connect.Password) > 0 {
		if _, err := h.checkDeviceSAS(string(pk.Connect.Password), auth, info.DeviceID, now); err != nil {
			return notAuthorized("%v", err)
		}
		return packets.CodeSuccess, nil
	}
	if err := checkThumbprint(cl, auth); err != nil {
		return notAuthorized("%v", err)
	}
	return packets.CodeSuccess, nil
}

// checkDeviceSAS verifies a device's SAS token and returns its expiry. A
// token may be signed with one of the device's keys or with the hub's
// policy key (a policy with DeviceConnect, as a token service would use).
func (h *Hub) checkDeviceSAS(token string, auth authData, deviceID string, now time.Time) (time.Time, error) {
	tok, err := iothub.ParseSAS(token)
	if err != nil {
		return time.Time{}, err
	}
	if tok.Expired(now) {
		return time.Time{}, fmt.Errorf("%w at %s", iothub.ErrSASExpired, tok.Expiry.UTC().Format(time.RFC3339))
	}
	if !tok.Covers(iothub.DeviceResource(h.cfg.HostName, deviceID)) {
		return time.Time{}, fmt.Errorf("hub: SAS token for %q does not cover device %q", tok.Resource, deviceID)
	}
	var keys [][]byte
	switch tok.KeyName {
	case "":
		for _, k := range []string{auth.PrimaryKey, auth.SecondaryKey} {
			if b, err := base64.StdEncoding.DecodeString(k); err == nil && len(b) > 0 {
				keys = append(keys, b)
			}
		}
	case ServicePolicy:
		keys = append(keys, h.svcKey)
	default:
		return time.Time{}, fmt.Errorf("hub: unknown shared access policy %q", tok.KeyName)
	}
	for _, k := range keys {
		if tok.Verify(k) == nil {
			return tok.Expiry, nil
		}
	}
	return time.Time{}, iothub.ErrSASSignature
}

// tokenExpiry is the expiry of the SAS token in a CONNECT that has already
// been authenticated; zero for X.509.
func (h *Hub) tokenExpiry(pk packets.Packet) time.Time {
	if !pk.Connect.PasswordFlag || len(pk.Connect.Password) == 0 {
		return time.Time{}
	}
	tok, err := iothub.ParseSAS(string(pk.Connect.Password))
	if err != nil {
		return time.Time{}
	}
	return tok.Expiry
}

// checkThumbprint authenticates an X.509 device: its TLS client certificate
// must match one of the registered thumbprints (SHA-1 as IoT Hub shows
// them, or SHA-256).
func checkThumbprint(cl *mqtt.Client, auth authData) error {
	if auth.Type != iothub.AuthSelfSigned {
		return errors.New("no password given and the device does not use X.509")
	}
	tc, ok := cl.Net.Conn.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return errors.New("no TLS client certificate")
	}
	certs := tc.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return errors.New("no password and no TLS client certificate")
	}
	s1 := sha1.Sum(certs[0].Raw) //nolint:gosec // thumbprint, not a signature
	s256 := sha256.Sum256(certs[0].Raw)
	for _, want := range []string{auth.PrimaryThumbprint, auth.SecondaryThumbprint} {
		w := normalizeThumbprint(want)
		if w != "" && (w == hex.EncodeToString(s1[:]) || w == hex.EncodeToString(s256[:])) {
			return nil
		}
	}
	return errors.New("client certificate thumbprint does not match the device's")
}

// normalizeThumbprint lower-cases a thumbprint and drops the separators
// tools print (colons, spaces).
func normalizeThumbprint(s string) string {
	return strings.ToLower(strings.NewReplacer(":", "", " ", "", "-", "").Replace(s))
}

// OnSessionEstablished registers the live connection and starts its twin
// request worker and its token-expiry timer.
func (k *hook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	h := k.h
	if h.dpsConnOf(cl) != nil {
		return // not a device session: dps.go answers its requests
	}
	s := &session{id: cl.ID, cl: cl, work: make(chan twinRequest, 16), done: make(chan struct{})}
	if exp := h.tokenExpiry(pk); !exp.IsZero() {
		// MQTT 3.1.1 cannot re-authenticate in band: at expiry the hub
		// closes the connection and the device must reconnect.
		s.exp = time.AfterFunc(time.Until(exp), func() {
			h.log.Info("SAS token expired, closing connection", zap.String("device_id", s.id))
			cl.Stop(errTokenExpired)
		})
	}
	h.sessMu.Lock()
	old := h.sessions[s.id]
	h.sessions[s.id] = s
	h.conns[cl] = s
	h.signalLocked()
	h.sessMu.Unlock()
	if old != nil && old.cl != cl {
		old.cl.Stop(errTakenOver)
	}
	h.touch(s.id, time.Now())
	h.wg.Add(1)
	go h.runSession(s)
	h.log.Info("device connected", zap.String("device_id", s.id), zap.String("remote", cl.Net.Remote),
		zap.String("listener", cl.Net.Listener), zap.Uint16("keepalive", cl.State.Keepalive))
}

// OnDisconnect ends the session.
func (k *hook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	h := k.h
	if h.dpsRemove(cl) {
		return
	}
	h.sessMu.Lock()
	s := h.conns[cl]
	delete(h.conns, cl)
	if s != nil && h.sessions[s.id] == s {
		delete(h.sessions, s.id)
		h.signalLocked()
	}
	h.sessMu.Unlock()
	if s == nil {
		return
	}
	if s.exp != nil {
		s.exp.Stop()
	}
	close(s.done)
	h.touch(s.id, time.Now())
	if cause := cl.StopCause(); cause != nil {
		err = cause
	}
	h.log.Info("device disconnected", zap.String("device_id", s.id), zap.NamedError("reason", err))
}

// signalLocked wakes everything waiting for a session change. The caller
// holds sessMu.
func (h *Hub) signalLocked() {
	close(h.sessChanged)
	h.sessChanged = make(chan struct{})
}

func (h *Hub) sessionOf(cl *mqtt.Client) *session {
	h.sessMu.Lock()
	defer h.sessMu.Unlock()
	return h.conns[cl]
}

func (h *Hub) session(id string) *session {
	h.sessMu.Lock()
	defer h.sessMu.Unlock()
	return h.sessions[id]
}

// touch records device activity; it is saved with the next record write.
func (h *Hub) touch(id string, now time.Time) {
	if d := h.store.get(id); d != nil {
		d.mu.Lock()
		d.lastActivity = now
		d.mu.Unlock()
	}
}

// OnACLCheck allows a device only the documented topic filters, at most
// maxSubscriptions at once. Publishes are checked in OnPacketRead, which
// can close the connection.
func (k *hook) OnACLCheck(cl *mqtt.Client, filter string, write bool) bool {
	if write {
		return true
	}
	s := k.h.sessionOf(cl)
	if s == nil {
		return k.h.dpsConnOf(cl) != nil && filter == dps.ResponseFilter
	}
	switch filter {
	case iothub.MethodsFilter, iothub.TwinResponseFilter, iothub.DesiredFilter, iothub.C2DFilter(s.id):
	default:
		k.h.log.Info("subscription refused", zap.String("device_id", s.id), zap.String("filter", filter))
		return false
	}
	if _, ok := cl.State.Subscriptions.Get(filter); !ok && cl.State.Subscriptions.Len() >= maxSubscriptions {
		k.h.log.Info("subscription refused: too many", zap.String("device_id", s.id), zap.String("filter", filter))
		return false
	}
	return true
}

func (k *hook) OnSubscribed(*mqtt.Client, packets.Packet, []byte) { k.h.signal() }
func (k *hook) OnUnsubscribed(*mqtt.Client, packets.Packet)       { k.h.signal() }

func (h *Hub) signal() {
	h.sessMu.Lock()
	h.signalLocked()
	h.sessMu.Unlock()
}

// OnPacketRead screens a connection's CONNECT (screenConnect), and closes
// the connection of a device that publishes QoS 2 or to a topic it may not
// use, as IoT Hub does.
func (k *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	h := k.h
	s := h.sessionOf(cl)
	if s == nil {
		if c := h.dpsConnOf(cl); c != nil {
			return h.dpsScreen(cl, c, pk)
		}
		if pk.FixedHeader.Type == packets.Connect {
			return h.screenConnect(cl, pk) // the first packet; a second CONNECT is the broker's to refuse
		}
		return pk, nil
	}
	if pk.FixedHeader.Type != packets.Publish {
		return pk, nil
	}
	var reason error
	if pk.FixedHeader.Qos > 1 {
		reason = errQoS2
	} else if !s.mayPublish(pk.TopicName) {
		reason = errForbiddenTopic
	}
	if reason != nil {
		h.log.Info("protocol violation, closing connection", zap.String("device_id", s.id),
			zap.String("topic", pk.TopicName), zap.Uint8("qos", pk.FixedHeader.Qos), zap.Error(reason))
		cl.Stop(reason)
		return pk, packets.ErrRejectPacket
	}
	return pk, nil
}

// screenConnect checks a CONNECT as an MQTT 3.1.1 server must, before the
// broker does: the broker validates with MQTT 5 rules and answers with
// MQTT 5 reason codes (0x82 protocol error, 0x80, 0x9A, 0x9B) that a 3.1.1
// CONNACK does not have. A 3.1.1 server answers 0x01 to another protocol
// level and 0x02 to an identifier it rejects; for anything else it cannot
// accept and has no return code for, it closes the connection without a
// CONNACK [MQTT-3.2.2-6]. A returned error closes the connection.
//
// What 3.1.1 allows and the hub does not act on is cleared so that the
// broker's MQTT 5 rules do not refuse it: the will (the hub drops wills,
// see OnConnect) and the password flag of an empty password (such a device
// authenticates by certificate, as without a password).
func (h *Hub) screenConnect(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	c := &pk.Connect
	refuse := func(code byte, err error, why string) (packets.Packet, error) {
		if code != 0 {
			_, _ = cl.Net.Conn.Write([]byte{0x20, 0x02, 0x00, code}) // CONNACK, no session present
		}
		h.log.Debug("CONNECT refused", zap.String("remote", cl.Net.Remote), zap.String("client_id", c.ClientIdentifier),
			zap.Uint8("connack", code), zap.String("why", why))
		// The broker ignores a hook's error unless it is ErrRejectPacket.
		return pk, fmt.Errorf("%w: %w", err, packets.ErrRejectPacket)
	}
	switch name := string(c.ProtocolName); {
	case name == "MQTT" && pk.ProtocolVersion == 4:
	case name == "MQTT", name == "MQIsdp" && pk.ProtocolVersion == 3: // MQTT 5, MQTT 3.1
		return refuse(0x01, errProtocolVersion, fmt.Sprintf("protocol %s level %d", name, pk.ProtocolVersion)) // [MQTT-3.1.2-2]
	default:
		return refuse(0, errBadConnect, fmt.Sprintf("protocol %q level %d", name, pk.ProtocolVersion)) // [MQTT-3.1.2-1]
	}
	switch {
	case pk.ReservedBit != 0:
		return refuse(0, errBadConnect, "reserved flag set") // [MQTT-3.1.2-3]
	case !c.WillFlag && (c.WillQos != 0 || c.WillRetain):
		return refuse(0, errBadConnect, "will QoS or retain without a will") // [MQTT-3.1.2-11], [MQTT-3.1.2-13], [MQTT-3.1.2-15]
	case c.WillQos > 2:
		return refuse(0, errBadConnect, "will QoS 3") // [MQTT-3.1.2-14]
	case c.WillFlag && c.WillQos == 2:
		return refuse(0, errQoS2, "will QoS 2") // no 3.1.1 return code says "QoS not supported"
	case c.WillFlag && c.WillTopic == "":
		return refuse(0, errBadConnect, "empty will topic") // [MQTT-4.7.3-1]
	case !c.UsernameFlag && c.PasswordFlag:
		return refuse(0, errBadConnect, "password without user name") // [MQTT-3.1.2-22]
	case c.ClientIdentifier == "":
		// IoT Hub needs the device id as client id; it assigns none.
		return refuse(0x02, errClientID, "empty client identifier") // [MQTT-3.1.3-8], [MQTT-3.1.3-9]
	}
	c.WillFlag, c.WillQos, c.WillRetain, c.WillTopic, c.WillPayload = false, 0, false, "", nil
	if c.PasswordFlag && len(c.Password) == 0 {
		c.PasswordFlag = false
	}
	return pk, nil
}

// mayPublish reports whether a device may publish to topic: twin requests,
// method responses, and telemetry for itself.
func (s *session) mayPublish(topic string) bool {
	t, err := iothub.ParseTopic(topic)
	if err != nil {
		return false
	}
	switch t.Kind {
	case iothub.KindTwinGet, iothub.KindTwinReported, iothub.KindMethodResponse:
		return true
	case iothub.KindTelemetry:
		return t.DeviceID == s.id && t.ModuleID == ""
	}
	return false
}

// OnPublish keeps device messages out of the broker's routing: nothing a
// device publishes goes to another client. The broker still acknowledges
// QoS 1.
func (k *hook) OnPublish(_ *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	return pk, packets.CodeSuccessIgnore
}

// OnPublished handles a device message after its PUBACK was sent.
func (k *hook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	h := k.h
	s := h.sessionOf(cl)
	if s == nil {
		if c := h.dpsConnOf(cl); c != nil {
			h.dpsPublished(cl, c, pk)
		}
		return
	}
	h.touch(s.id, time.Now())
	t, err := iothub.ParseTopic(pk.TopicName)
	if err != nil {
		return // refused in OnPacketRead
	}
	switch t.Kind {
	case iothub.KindMethodResponse:
		h.methodResponse(s, t, pk.Payload)
	case iothub.KindTwinGet, iothub.KindTwinReported:
		req := twinRequest{kind: t.Kind, rid: t.RID, payload: bytes.Clone(pk.Payload)}
		select {
		case s.work <- req:
		case <-s.done:
		case <-h.ctx.Done():
		}
	case iothub.KindTelemetry:
		h.log.Debug("telemetry", zap.String("device_id", s.id), zap.Int("bytes", len(pk.Payload)))
	}
}

// send publishes a message to one device at QoS 0. Topics such as
// $iothub/methods/POST/# are shared by every device, so the hub writes to
// the device's connection instead of routing through the broker.
func (h *Hub) send(s *session, topic string, payload []byte) error {
	return s.cl.WritePacket(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName:   topic,
		Payload:     payload,
	})
}

// Kick closes a device's connection, as IoT Hub does when it drops a
// device. It reports whether the device was connected.
func (h *Hub) Kick(deviceID string) bool {
	s := h.session(deviceID)
	if s == nil {
		return false
	}
	s.cl.Stop(errKicked)
	return true
}

// Connected reports whether a device has a live connection.
func (h *Hub) Connected(deviceID string) bool { return h.session(deviceID) != nil }
