package servicetest

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/twin"
)

// HostName is the hub name in the connection string: it has a dot, as real
// hub names do, and is never resolved (requests go to the loopback URL).
const HostName = "fake-hub.azure-devices.net"

// Policy is the shared access policy name.
const Policy = "iothubowner"

// Request is one request as the server received it.
type Request struct {
	Method string
	Path   string // unescaped
	Query  url.Values
	Header http.Header
	Body   []byte
	// AuthError is why the SAS token was refused, empty when it was valid.
	AuthError string
	// Faulted is set when a queued Fault answered the request.
	Faulted bool
	Time    time.Time // when it arrived
}

// Fault makes the next Count requests matching Method and Path fail.
type Fault struct {
	Method     string // empty matches any
	Path       string // exact unescaped path; empty matches any
	Count      int
	Status     int
	Code       int
	Message    string
	RetryAfter int // seconds, 0 for no header
}

// MethodHandler answers a direct method call; a non-nil error becomes the
// hub's error answer (404103 for an offline device, …).
type MethodHandler func(deviceID string, req iothub.MethodRequest) (iothub.MethodResult, *iothub.ServiceError)

// Server is the fake service endpoint.
type Server struct {
	*httptest.Server
	Key []byte // the policy key

	mu       sync.Mutex // guards everything below
	requests []Request
	faults   []Fault
	devices  map[string]iothub.Device
	twins    map[string]*twinState
	method   MethodHandler
	etagSeq  int
	pageCap  int
}

type twinState struct {
	tags     map[string]any
	desired  map[string]any
	reported map[string]any
	dver     int64
	rver     int64
	version  int64
	etag     string
	script   []map[string]any // reported documents served by successive GETs
}

// New starts a server. Close it when done.
func New() *Server {
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	s := &Server{Key: key, devices: map[string]iothub.Device{}, twins: map[string]*twinState{}}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	// Tests of untrusted certificates make handshakes fail on purpose.
	s.Config.ErrorLog = log.New(io.Discard, "", 0)
	s.StartTLS()
	return s
}

// ConnectionString is the service connection string for this server.
func (s *Server) ConnectionString() string {
	return iothub.ConnectionString{HostName: HostName, SharedAccessKeyName: Policy,
		SharedAccessKey: base64.StdEncoding.EncodeToString(s.Key)}.String()
}

// WriteCAFile writes the server's certificate as a PEM CA file in dir.
func (s *Server) WriteCAFile(dir string) (string, error) {
	p := filepath.Join(dir, "ca.pem")
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Certificate().Raw})
	return p, os.WriteFile(p, b, 0o600)
}

// Requests returns the requests received so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

// Fail queues a fault.
func (s *Server) Fail(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, f)
}

// HandleMethods sets the direct-method handler (default: every device is
// offline, 404103).
func (s *Server) HandleMethods(h MethodHandler) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.method = h
}

// LimitQueryPages makes query pages at most n items long whatever the
// client asks, as the real hub may.
func (s *Server) LimitQueryPages(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pageCap = n
}

// AddDevice registers a SAS device with a fresh key and an empty twin.
func (s *Server) AddDevice(id string) iothub.Device {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := make([]byte, 32)
	_, _ = rand.Read(k)
	d := iothub.Device{DeviceID: id, Status: "enabled", ConnectionState: "Disconnected",
		Authentication: iothub.Authentication{Type: iothub.AuthSAS, SymmetricKey: &iothub.SymmetricKey{
			PrimaryKey: base64.StdEncoding.EncodeToString(k), SecondaryKey: base64.StdEncoding.EncodeToString(k[:16])}}}
	s.register(d)
	return s.devices[id]
}

// SetReported replaces a device's reported properties.
func (s *Server) SetReported(id string, reported map[string]any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.twins[id]; t != nil {
		t.reported = reported
		t.rver++
		t.version++
	}
}

// ScriptReported makes successive GET /twins/{id} serve the given reported
// documents in order (the last one stays), as if the device reported them
// between the reads.
func (s *Server) ScriptReported(id string, docs ...map[string]any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.twins[id]; t != nil {
		t.script = docs
	}
}

func (s *Server) register(d iothub.Device) {
	s.etagSeq++
	d.ETag = fmt.Sprintf("\"%s\"", base64.StdEncoding.EncodeToString([]byte(strconv.Itoa(s.etagSeq))))
	d.GenerationID = strconv.Itoa(600000000 + s.etagSeq)
	s.devices[d.DeviceID] = d
	if s.twins[d.DeviceID] == nil {
		s.twins[d.DeviceID] = &twinState{tags: map[string]any{}, desired: map[string]any{}, reported: map[string]any{},
			dver: 1, rver: 1, version: 2, etag: s.nextEtag()}
	}
}

func (s *Server) nextEtag() string {
	s.etagSeq++
	return base64.StdEncoding.EncodeToString([]byte("etag-" + strconv.Itoa(s.etagSeq)))
}

func writeError(w http.ResponseWriter, status, code int, msg string, retryAfter int) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("iothub-errorcode", strconv.Itoa(code))
	if retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
	}
	w.WriteHeader(status)
	_, _ = w.Write(iothub.ErrorBody(code, msg, nil))
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, 500, iothub.CodeServerError, err.Error(), 0)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func (s *Server) authError(r *http.Request) string {
	tok, err := iothub.ParseSAS(r.Header.Get("Authorization"))
	switch {
	case err != nil:
		return err.Error()
	case tok.KeyName != Policy:
		return "skn " + tok.KeyName + " is not " + Policy
	case tok.Verify(s.Key) != nil:
		return "signature does not match"
	case tok.Expired(time.Now()):
		return "token expired"
	case !strings.EqualFold(tok.Resource, HostName):
		return "sr " + tok.Resource + " is not the hub"
	}
	return ""
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	rec := Request{Method: r.Method, Path: r.URL.Path, Query: r.URL.Query(), Header: r.Header.Clone(), Body: body,
		AuthError: s.authError(r), Time: time.Now()}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, rec)
	if rec.AuthError != "" {
		writeError(w, http.StatusUnauthorized, 401002, "IotHubUnauthorizedAccess: "+rec.AuthError, 0)
		return
	}
	if v := r.URL.Query().Get("api-version"); v != iothub.APIVersion {
		writeError(w, http.StatusBadRequest, 400001, "api-version "+v+" is not supported", 0)
		return
	}
	for i, f := range s.faults {
		if (f.Method == "" || f.Method == r.Method) && (f.Path == "" || f.Path == r.URL.Path) && f.Count > 0 {
			s.faults[i].Count--
			s.requests[len(s.requests)-1].Faulted = true
			writeError(w, f.Status, f.Code, f.Message, f.RetryAfter)
			return
		}
	}
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	switch {
	case len(parts) == 1 && parts[0] == "devices" && r.Method == http.MethodGet:
		top, _ := strconv.Atoi(r.URL.Query().Get("top"))
		out := []iothub.Device{}
		for _, id := range slices.Sorted(maps.Keys(s.devices)) {
			if top > 0 && len(out) == top {
				break
			}
			out = append(out, s.devices[id])
		}
		writeJSON(w, 200, out)
	case len(parts) == 2 && parts[0] == "devices" && parts[1] == "query" && r.Method == http.MethodPost:
		s.query(w, r, body)
	case len(parts) == 2 && parts[0] == "devices":
		s.device(w, r, parts[1], body)
	case len(parts) == 2 && parts[0] == "twins":
		s.twin(w, r, parts[1], body)
	case len(parts) == 3 && parts[0] == "twins" && parts[2] == "methods" && r.Method == http.MethodPost:
		s.invoke(w, parts[1], body)
	default:
		writeError(w, http.StatusNotFound, 404000, "no route for "+r.Method+" "+r.URL.Path, 0)
	}
}

func (s *Server) device(w http.ResponseWriter, r *http.Request, id string, body []byte) {
	d, ok := s.devices[id]
	switch r.Method {
	case http.MethodGet:
		if !ok {
			writeError(w, 404, iothub.CodeDeviceNotFound, "Device "+id+" not registered", 0)
			return
		}
		writeJSON(w, 200, d)
	case http.MethodPut:
		var nd iothub.Device
		if err := json.Unmarshal(body, &nd); err != nil || nd.DeviceID != id {
			writeError(w, 400, iothub.CodeArgumentInvalid, "bad device body", 0)
			return
		}
		if ok && r.Header.Get("If-Match") == "" {
			writeError(w, 409, iothub.CodeDeviceAlreadyExists, "A device with ID '"+id+"' is already registered.", 0)
			return
		}
		nd.ConnectionState = "Disconnected"
		s.register(nd)
		writeJSON(w, 200, s.devices[id])
	case http.MethodDelete:
		if r.Header.Get("If-Match") == "" {
			writeError(w, 412, iothub.CodePreconditionFailed, "If-Match is required", 0)
			return
		}
		if !ok {
			writeError(w, 404, iothub.CodeDeviceNotFound, "Device "+id+" not registered", 0)
			return
		}
		delete(s.devices, id)
		delete(s.twins, id)
		w.WriteHeader(http.StatusNoContent)
	default:
		writeError(w, 405, 405000, "method not allowed", 0)
	}
}

func (s *Server) twinDoc(id string, t *twinState) map[string]any {
	d := s.devices[id]
	desired := maps.Clone(t.desired)
	desired["$version"] = t.dver
	reported := maps.Clone(t.reported)
	reported["$version"] = t.rver
	return map[string]any{
		"deviceId": id, "etag": t.etag, "version": t.version, "status": d.Status,
		"connectionState": d.ConnectionState, "authenticationType": d.Authentication.Type,
		"tags":       t.tags,
		"properties": map[string]any{"desired": desired, "reported": reported},
	}
}

func (s *Server) twin(w http.ResponseWriter, r *http.Request, id string, body []byte) {
	t := s.twins[id]
	if t == nil {
		writeError(w, 404, iothub.CodeDeviceNotFound, "Device "+id+" not registered", 0)
		return
	}
	switch r.Method {
	case http.MethodGet:
		if len(t.script) > 0 {
			t.reported = t.script[0]
			t.rver++
			t.version++
			if len(t.script) > 1 {
				t.script = t.script[1:]
			}
		}
		writeJSON(w, 200, s.twinDoc(id, t))
		return
	case http.MethodPatch, http.MethodPut:
	default:
		writeError(w, 405, 405000, "method not allowed", 0)
		return
	}
	if m := r.Header.Get("If-Match"); m != "" && m != "*" && m != `"`+t.etag+`"` {
		writeError(w, 412, iothub.CodePreconditionFailed, "etag mismatch", 0)
		return
	}
	var patch struct {
		Tags       map[string]any `json:"tags"`
		Properties *struct {
			Desired  map[string]any `json:"desired"`
			Reported map[string]any `json:"reported"`
		} `json:"properties"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := dec.Decode(&patch); err != nil {
		writeError(w, 400, iothub.CodeIotHubFormatError, "bad twin body: "+err.Error(), 0)
		return
	}
	if patch.Properties != nil && patch.Properties.Reported != nil {
		writeError(w, 400, iothub.CodeArgumentInvalid, "reported properties are read-only", 0)
		return
	}
	if r.Method == http.MethodPut {
		t.tags, t.desired = map[string]any{}, map[string]any{}
	}
	if patch.Tags != nil {
		t.tags = twin.Merge(t.tags, patch.Tags)
	}
	if patch.Properties != nil && patch.Properties.Desired != nil {
		t.desired = twin.Merge(t.desired, patch.Properties.Desired)
		t.dver++
	}
	t.version++
	t.etag = s.nextEtag()
	writeJSON(w, 200, s.twinDoc(id, t))
}

func (s *Server) invoke(w http.ResponseWriter, id string, body []byte) {
	var req iothub.MethodRequest
	if err := json.Unmarshal(body, &req); err != nil || req.MethodName == "" {
		writeError(w, 400, iothub.CodeArgumentInvalid, "bad method request", 0)
		return
	}
	if _, ok := s.devices[id]; !ok {
		writeError(w, 404, iothub.CodeDeviceNotFound, "Device "+id+" not registered", 0)
		return
	}
	if s.method == nil {
		writeError(w, 404, iothub.CodeDeviceNotOnline, "The operation failed because the requested device isn't online or hasn't registered the direct method callback.", 0)
		return
	}
	h := s.method
	// The handler may call back into the server (ScriptReported): release
	// the lock while it runs.
	s.mu.Unlock()
	res, serr := h(id, req)
	s.mu.Lock()
	if serr != nil {
		writeError(w, serr.HTTPStatus, serr.Code, serr.Message, 0)
		return
	}
	writeJSON(w, 200, res)
}

func (s *Server) query(w http.ResponseWriter, r *http.Request, body []byte) {
	var q struct {
		Query string `json:"query"`
	}
	if err := json.Unmarshal(body, &q); err != nil || !strings.HasPrefix(strings.ToUpper(q.Query), "SELECT") {
		writeError(w, 400, iothub.CodeArgumentInvalid, "bad query", 0)
		return
	}
	ids := slices.Sorted(maps.Keys(s.twins))
	start := 0
	if c := r.Header.Get("x-ms-continuation"); c != "" {
		n, err := strconv.Atoi(c)
		if err != nil || n < 0 || n > len(ids) {
			writeError(w, 400, iothub.CodeArgumentInvalid, "bad continuation token", 0)
			return
		}
		start = n
	}
	size := len(ids)
	if m, err := strconv.Atoi(r.Header.Get("x-ms-max-item-count")); err == nil && m > 0 {
		size = m
	}
	if s.pageCap > 0 {
		size = min(size, s.pageCap)
	}
	end := min(len(ids), start+size)
	items := []any{}
	for _, id := range ids[start:end] {
		items = append(items, s.twinDoc(id, s.twins[id]))
	}
	if end < len(ids) {
		w.Header().Set("x-ms-continuation", strconv.Itoa(end))
	}
	writeJSON(w, 200, items)
}
