package hub

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
)

// The hub is also a Device Provisioning Service instance that assigns every
// device to itself. It shares the hub's host name and listeners: a DPS
// device connects to the same MQTT port (its username,
// "{idScope}/registrations/{registrationId}/api-version=…", tells the two
// protocols apart) and the DPS service API is served beside the hub's
// (/enrollments, /enrollmentGroups, /registrations) with its own policy,
// provisioningserviceowner. So the official SDKs reach both on this machine
// with provisioningHost = the hub's host name.

// Files of the DPS side in the state directory.
const (
	DPSConnectionStringFile = "dps-connection-string" // provisioningserviceowner policy (0600)
	DPSIDScopeFile          = "dps-id-scope"
	dpsStateFile            = "dps.json"
	dpsStateFormat          = 1
)

// dpsRetryAfter is the retry-after of a 202: the hub assigns at once, so
// one second is the least the protocol can say.
const dpsRetryAfter = time.Second

// maxOperations bounds the operations kept for status polls.
const maxOperations = 4096

// Sentinel errors of the DPS side.
var errDPSTopic = errors.New("hub: publish to a topic a DPS device may not use")

// dpsData is what the DPS side persists (dps.json).
type dpsData struct {
	Format        int                                  `json:"format"`
	IDScope       string                               `json:"idScope"`
	Enrollments   map[string]*dps.IndividualEnrollment `json:"enrollments"`
	Groups        map[string]*dps.EnrollmentGroup      `json:"enrollmentGroups"`
	Registrations map[string]*dpsRegistration          `json:"registrations"`
}

// dpsRegistration is a registration state with where it came from.
type dpsRegistration struct {
	State   dps.RegistrationState `json:"state"`
	GroupID string                `json:"groupId,omitempty"` // empty for an individual enrollment
}

type dpsOperation struct {
	id     string
	regID  string
	result dps.OperationResult
	at     time.Time
}

// dpsServer is the hub's DPS side.
type dpsServer struct {
	path   string
	policy iothub.ConnectionString
	key    []byte

	mu    sync.Mutex // guards data, ops, order, conns
	data  dpsData
	ops   map[string]*dpsOperation
	order []string // operation ids, oldest first
	conns map[*mqtt.Client]*dpsConn
}

// dpsConn is an authenticated DPS device connection.
type dpsConn struct {
	regID   string
	groupID string // set when authenticated by an enrollment group
	key     string // the device key it proved (derived for a group)
	// thumbprint is the SHA-1 thumbprint of the certificate of an X.509
	// registration (key is empty then).
	thumbprint string
}

func openDPS(stateDir, hostName string) (*dpsServer, error) {
	s := &dpsServer{path: filepath.Join(stateDir, dpsStateFile), ops: map[string]*dpsOperation{}, conns: map[*mqtt.Client]*dpsConn{}}
	b, err := os.ReadFile(s.path)
	switch {
	case err == nil && len(bytes.TrimSpace(b)) > 0:
		if err := json.Unmarshal(b, &s.data); err != nil {
			return nil, fmt.Errorf("hub: decode %s: %w", s.path, err)
		}
		if s.data.Format != dpsStateFormat {
			return nil, fmt.Errorf("hub: %s has format %d, this hub reads %d", s.path, s.data.Format, dpsStateFormat)
		}
	case err == nil || errors.Is(err, fs.ErrNotExist):
		s.data = dpsData{Format: dpsStateFormat, IDScope: newIDScope()}
	default:
		return nil, fmt.Errorf("hub: read %s: %w", s.path, err)
	}
	if s.data.Enrollments == nil {
		s.data.Enrollments = map[string]*dps.IndividualEnrollment{}
	}
	if s.data.Groups == nil {
		s.data.Groups = map[string]*dps.EnrollmentGroup{}
	}
	if s.data.Registrations == nil {
		s.data.Registrations = map[string]*dpsRegistration{}
	}
	if err := s.saveLocked(); err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(filepath.Join(stateDir, DPSIDScopeFile), []byte(s.data.IDScope+"\n"), 0o644); err != nil {
		return nil, fmt.Errorf("hub: write %s: %w", DPSIDScopeFile, err)
	}
	// The policy key is kept like the hub's: created once, host rewritten.
	path := filepath.Join(stateDir, DPSConnectionStringFile)
	b, err = os.ReadFile(path)
	switch {
	case err == nil:
		cs, perr := iothub.ParseConnectionString(strings.TrimSpace(string(b)))
		if perr != nil || !cs.IsService() {
			return nil, fmt.Errorf("hub: %s does not hold a service connection string: %v", path, perr)
		}
		s.policy = cs
	case errors.Is(err, fs.ErrNotExist):
		s.policy = iothub.ConnectionString{SharedAccessKeyName: dps.ServicePolicy, SharedAccessKey: newKey()}
	default:
		return nil, fmt.Errorf("hub: read %s: %w", path, err)
	}
	if s.policy.HostName != hostName || err != nil {
		s.policy.HostName = hostName
		if werr := atomicfile.WriteFile(path, []byte(s.policy.String()+"\n"), 0o600); werr != nil {
			return nil, fmt.Errorf("hub: write %s: %w", path, werr)
		}
	}
	s.key, err = s.policy.Key()
	return s, err
}

// newIDScope makes an id scope shaped like DPS's: "0ne" and 8 hex digits.
func newIDScope() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return "0ne" + strings.ToUpper(hex.EncodeToString(b))
}

func newOperationID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return "4." + hex.EncodeToString(b[:8]) + "." + hex.EncodeToString(b[8:])
}

func (s *dpsServer) saveLocked() error {
	b, err := json.MarshalIndent(s.data, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(s.path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("hub: write %s: %w", s.path, err)
	}
	return nil
}

// IDScope is the id scope devices name in their DPS username.
func (h *Hub) IDScope() string { return h.dps.data.IDScope }

// DPSConnectionString is the provisioningserviceowner connection string of
// the DPS service API.
func (h *Hub) DPSConnectionString() string { return h.dps.policy.String() }

// DPSConnectionStringFile is the path of the file holding DPSConnectionString.
func (h *Hub) DPSConnectionStringFile() string {
	return filepath.Join(h.cfg.StateDir, DPSConnectionStringFile)
}

// isDPSConnect reports whether a CONNECT is for the DPS side.
func isDPSConnect(pk packets.Packet) bool {
	return dps.IsUsername(string(pk.Connect.Username))
}

// dpsAuthenticate checks a DPS CONNECT: id scope, client id, and a
// registration SAS token signed with an individual enrollment's key or a
// key derived from a symmetric-key enrollment group's.
func (h *Hub) dpsAuthenticate(cl *mqtt.Client, pk packets.Packet, now time.Time) (*dpsConn, packets.Code, error) {
	info, err := dps.ParseUsername(string(pk.Connect.Username))
	if err != nil {
		return nil, packets.Err3NotAuthorized, err
	}
	s := h.dps
	s.mu.Lock()
	scope := s.data.IDScope
	s.mu.Unlock()
	if info.IDScope != scope {
		return nil, packets.Err3NotAuthorized, fmt.Errorf("hub: DPS: unknown id scope %q", info.IDScope)
	}
	if cl.ID != info.RegistrationID {
		return nil, packets.Err3ClientIdentifierNotValid, fmt.Errorf("hub: DPS: client id %q does not match the registration %q", cl.ID, info.RegistrationID)
	}
	if !pk.Connect.PasswordFlag || len(pk.Connect.Password) == 0 {
		// X.509 attestation: the TLS client certificate proves the identity.
		var certs []*x509.Certificate
		if tc, ok := cl.Net.Conn.(interface{ ConnectionState() tls.ConnectionState }); ok {
			certs = tc.ConnectionState().PeerCertificates
		}
		if len(certs) == 0 {
			return nil, packets.Err3NotAuthorized, errNoClientCert
		}
		c, err := s.x509Match(info.RegistrationID, certs, now)
		if err != nil {
			return nil, packets.Err3NotAuthorized, err
		}
		return c, packets.CodeSuccess, nil
	}
	tok, err := iothub.ParseSAS(string(pk.Connect.Password))
	if err != nil {
		return nil, packets.Err3NotAuthorized, err
	}
	if tok.Expired(now) {
		return nil, packets.Err3NotAuthorized, iothub.ErrSASExpired
	}
	if !tok.Covers(dps.Resource(info.IDScope, info.RegistrationID)) {
		return nil, packets.Err3NotAuthorized, fmt.Errorf("hub: DPS: SAS token for %q does not cover registration %q", tok.Resource, info.RegistrationID)
	}
	c, ok := s.match(info.RegistrationID, tok)
	if !ok {
		return nil, packets.Err3NotAuthorized, fmt.Errorf("hub: DPS: 401002 no enrollment of %q matches the token's key", info.RegistrationID)
	}
	return c, packets.CodeSuccess, nil
}

// match finds the enrollment whose key signed tok: the registration's
// individual enrollment first, then every symmetric-key group.
func (s *dpsServer) match(regID string, tok iothub.SAS) (*dpsConn, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	verify := func(k string) bool {
		b, err := base64.StdEncoding.DecodeString(k)
		return err == nil && len(b) > 0 && tok.Verify(b) == nil
	}
	if e := s.data.Enrollments[regID]; e != nil {
		if sk := e.Attestation.SymmetricKey; sk != nil {
			for _, k := range []string{sk.PrimaryKey, sk.SecondaryKey} {
				if k != "" && verify(k) {
					return &dpsConn{regID: regID, key: k}, true
				}
			}
		}
		return nil, false // an individual enrollment overrides the groups
	}
	ids := make([]string, 0, len(s.data.Groups))
	for id := range s.data.Groups {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		g := s.data.Groups[id]
		sk := g.Attestation.SymmetricKey
		if sk == nil {
			continue
		}
		for _, gk := range []string{sk.PrimaryKey, sk.SecondaryKey} {
			if gk == "" {
				continue
			}
			k, err := dps.DeriveKeyBase64(gk, regID)
			if err == nil && verify(k) {
				return &dpsConn{regID: regID, groupID: id, key: k}, true
			}
		}
	}
	return nil, false
}

func (h *Hub) dpsConnOf(cl *mqtt.Client) *dpsConn {
	h.dps.mu.Lock()
	defer h.dps.mu.Unlock()
	return h.dps.conns[cl]
}

func (h *Hub) dpsAdd(cl *mqtt.Client, c *dpsConn) {
	h.dps.mu.Lock()
	h.dps.conns[cl] = c
	h.dps.mu.Unlock()
}

// dpsRemove forgets a connection; it reports whether it was a DPS one.
func (h *Hub) dpsRemove(cl *mqtt.Client) bool {
	h.dps.mu.Lock()
	defer h.dps.mu.Unlock()
	_, ok := h.dps.conns[cl]
	delete(h.dps.conns, cl)
	return ok
}

// dpsScreen closes a DPS connection that publishes QoS 2 or to a topic
// other than the two requests.
func (h *Hub) dpsScreen(cl *mqtt.Client, c *dpsConn, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Publish {
		return pk, nil
	}
	var reason error
	if pk.FixedHeader.Qos > 1 {
		reason = errQoS2
	} else if _, err := dps.ParseRequestTopic(pk.TopicName); err != nil {
		reason = errDPSTopic
	}
	if reason != nil {
		h.log.Info("DPS protocol violation, closing connection", zap.String("registration_id", c.regID),
			zap.String("topic", pk.TopicName), zap.Error(reason))
		cl.Stop(reason)
		return pk, packets.ErrRejectPacket
	}
	return pk, nil
}

// dpsPublished answers a DPS request. It runs on the connection's read
// goroutine and never waits on anything but the registry.
func (h *Hub) dpsPublished(cl *mqtt.Client, c *dpsConn, pk packets.Packet) {
	req, err := dps.ParseRequestTopic(pk.TopicName)
	if err != nil {
		return
	}
	now := time.Now()
	reply := func(status int, retryAfter time.Duration, body []byte) {
		_ = cl.WritePacket(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish},
			TopicName:   dps.ResponseTopic(status, req.RID, retryAfter),
			Payload:     body,
		})
	}
	fail := func(status, code int, format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		h.log.Info("DPS request refused", zap.String("registration_id", c.regID), zap.Int("error_code", code), zap.String("message", msg))
		reply(status, 0, dps.ErrorBody(code, msg, now))
	}
	switch req.Kind {
	case dps.KindStatus:
		h.dps.mu.Lock()
		op := h.dps.ops[req.OperationID]
		var res dps.OperationResult
		if op != nil {
			res = op.result
		}
		h.dps.mu.Unlock()
		if op == nil || op.regID != c.regID {
			fail(http.StatusNotFound, dps.CodeOperationNotFound, "Operation %s not found", req.OperationID)
			return
		}
		b, _ := json.Marshal(res)
		reply(http.StatusOK, 0, b)
	case dps.KindRegister:
		var body dps.RegistrationRequest
		if len(bytes.TrimSpace(pk.Payload)) > 0 {
			if err := json.Unmarshal(pk.Payload, &body); err != nil {
				fail(http.StatusBadRequest, dps.CodeBadRequest, "Registration body is not valid JSON: %v", err)
				return
			}
		}
		if body.RegistrationID != "" && body.RegistrationID != c.regID {
			fail(http.StatusBadRequest, dps.CodeBadRequest, "Registration id %q in the body does not match %q", body.RegistrationID, c.regID)
			return
		}
		res, serr := h.dpsAssign(c, body.Payload, now)
		if serr != nil {
			fail(serr.status, serr.code, "%s", serr.msg)
			return
		}
		b, _ := json.Marshal(dps.OperationResult{OperationID: res.OperationID, Status: dps.StatusAssigning})
		reply(http.StatusAccepted, dpsRetryAfter, b)
	}
}

// dpsAssign runs a registration to its end: the device identity is created
// (or its keys brought up to date) in the registry and the outcome is kept
// for the status poll and the service API.
func (h *Hub) dpsAssign(c *dpsConn, payload json.RawMessage, now time.Time) (dps.OperationResult, *svcError) {
	s := h.dps
	s.mu.Lock()
	var status, deviceID string
	if c.groupID != "" {
		g := s.data.Groups[c.groupID]
		if g == nil {
			s.mu.Unlock()
			return dps.OperationResult{}, errf(http.StatusUnauthorized, dps.CodeUnauthorized, "Enrollment group %s was deleted", c.groupID)
		}
		status, deviceID = g.ProvisioningStatus, c.regID
	} else {
		e := s.data.Enrollments[c.regID]
		if e == nil {
			s.mu.Unlock()
			return dps.OperationResult{}, errf(http.StatusUnauthorized, dps.CodeUnauthorized, "Enrollment %s was deleted", c.regID)
		}
		status, deviceID = e.ProvisioningStatus, e.DeviceID
		if deviceID == "" {
			deviceID = c.regID
		}
	}
	prev := s.data.Registrations[c.regID]
	s.mu.Unlock()

	ts := now.UTC().Format(time.RFC3339Nano)
	st := dps.RegistrationState{RegistrationID: c.regID, CreatedDateTimeUTC: ts, LastUpdatedDateTimeUTC: ts, ETag: strconv.Quote(newOperationID())}
	if prev != nil && prev.State.CreatedDateTimeUTC != "" {
		st.CreatedDateTimeUTC = prev.State.CreatedDateTimeUTC
	}
	opStatus := dps.StatusAssigned
	if status == "disabled" {
		st.Status, opStatus = dps.StatusDisabled, dps.StatusDisabled
		st.ErrorCode, st.ErrorMessage = 403000, "The enrollment is disabled"
	} else {
		auth := iothub.Authentication{Type: iothub.AuthSAS, SymmetricKey: &iothub.SymmetricKey{PrimaryKey: c.key, SecondaryKey: c.key}}
		if c.thumbprint != "" {
			auth = c.x509Auth()
		}
		_, serr := h.putDevice(iothub.Device{DeviceID: deviceID, Authentication: auth}, deviceID, "")
		sub := "initialAssignment"
		if serr != nil && serr.code == iothub.CodeDeviceAlreadyExists {
			_, serr = h.putDevice(iothub.Device{DeviceID: deviceID, Authentication: auth}, deviceID, "*")
			sub = "reprovisionedToInitialAssignment"
		}
		if serr != nil {
			st.Status, opStatus = dps.StatusFailed, dps.StatusFailed
			st.ErrorCode, st.ErrorMessage = dps.CodeInternal, "Device identity not created: "+serr.msg
		} else {
			st.Status, st.Substatus, st.AssignedHub, st.DeviceID = dps.StatusAssigned, sub, h.cfg.HostName, deviceID
		}
	}
	var mp dps.ModelPayload
	_ = json.Unmarshal(payload, &mp)
	op := &dpsOperation{id: newOperationID(), regID: c.regID, at: now}
	op.result = dps.OperationResult{OperationID: op.id, Status: opStatus, RegistrationState: &st}

	s.mu.Lock()
	s.data.Registrations[c.regID] = &dpsRegistration{State: st, GroupID: c.groupID}
	err := s.saveLocked()
	s.ops[op.id] = op
	s.order = append(s.order, op.id)
	for len(s.order) > maxOperations {
		delete(s.ops, s.order[0])
		s.order = s.order[1:]
	}
	s.mu.Unlock()
	if err != nil {
		h.log.Error("DPS registration not stored", zap.String("registration_id", c.regID), zap.Error(err))
	}
	h.log.Info("DPS registration", zap.String("registration_id", c.regID), zap.String("enrollment_group", c.groupID),
		zap.String("device_id", st.DeviceID), zap.String("status", st.Status), zap.String("model_id", mp.ModelID))
	return op.result, nil
}

// dpsConnect is OnConnect for a DPS device.
func (h *Hub) dpsConnect(cl *mqtt.Client, pk packets.Packet) error {
	c, code, err := h.dpsAuthenticate(cl, pk, time.Now())
	if err != nil {
		h.log.Info("DPS device refused", zap.String("client_id", cl.ID), zap.String("remote", cl.Net.Remote),
			zap.Uint8("connack", code.Code), zap.Error(err))
		_ = h.broker.SendConnack(cl, code, false, nil)
		return err
	}
	cl.Properties.Will = mqtt.Will{}
	cl.State.Keepalive = h.keepAlive(pk.Connect.Keepalive)
	if ac, ok := cl.Net.Conn.(authenticated); ok {
		ac.authenticated()
	}
	h.dpsAdd(cl, c)
	h.log.Info("DPS device connected", zap.String("registration_id", c.regID), zap.String("enrollment_group", c.groupID),
		zap.String("remote", cl.Net.Remote))
	return nil
}
