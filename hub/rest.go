package hub

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/iothub"
)

// codeUnauthorizedAccess is IoT Hub's error for a refused service token.
const codeUnauthorizedAccess = 401002

// maxBody bounds a service request body: a method call may carry 128 KB of
// payload plus its envelope; twins are far smaller.
const maxBody = iothub.MaxMethodPayload + 64*1024

// errorNames are the iothub-errorcode header values IoT Hub sends.
var errorNames = map[int]string{
	iothub.CodeArgumentInvalid:     "ArgumentInvalid",
	iothub.CodeIotHubFormatError:   "IotHubFormatError",
	codeUnauthorizedAccess:         "IotHubUnauthorizedAccess",
	iothub.CodeDeviceNotFound:      "DeviceNotFound",
	iothub.CodeDeviceNotOnline:     "DeviceNotOnline",
	iothub.CodeDeviceAlreadyExists: "DeviceAlreadyExists",
	iothub.CodePreconditionFailed:  "PreconditionFailed",
	iothub.CodeMessageTooLarge:     "MessageTooLarge",
	iothub.CodeServerError:         "ServerError",
	iothub.CodeServiceUnavailable:  "ServiceUnavailable",
	iothub.CodeThrottlingException: "ThrottlingException",
	iothub.CodeGatewayTimeout:      "GatewayTimeout",
}

// routes is the service REST API, the optional file share and the optional
// MQTT-over-WebSocket endpoint.
func (h *Hub) routes(withWS bool) http.Handler {
	api := http.NewServeMux()
	api.HandleFunc("GET /devices", h.handleListDevices)
	api.HandleFunc("PUT /devices/{id}", h.handlePutDevice)
	api.HandleFunc("GET /devices/{id}", h.handleGetDevice)
	api.HandleFunc("DELETE /devices/{id}", h.handleDeleteDevice)
	api.HandleFunc("POST /devices/query", h.handleQuery)
	api.HandleFunc("GET /twins/{id}", h.handleGetTwin)
	api.HandleFunc("PATCH /twins/{id}", h.handleUpdateTwin)
	api.HandleFunc("PUT /twins/{id}", h.handleUpdateTwin)
	api.HandleFunc("POST /twins/{id}/methods", h.handleInvoke)
	api.HandleFunc("PUT /jobs/v2/{id}", h.handlePutJob)
	api.HandleFunc("GET /jobs/v2/query", h.handleListJobs)
	api.HandleFunc("GET /jobs/v2/{id}", h.handleGetJob)
	api.HandleFunc("POST /jobs/v2/{id}/cancel", h.handleCancelJob)
	api.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errf(http.StatusNotFound, 404000, "%s %s is not part of this hub's API", r.Method, r.URL.Path))
	})

	mux := http.NewServeMux()
	mux.Handle("/", h.authorize(api))
	h.dpsRoutes(mux)
	if h.cfg.FilesDir != "" {
		// No authentication, like a storage URL that carries its own SAS:
		// the agent downloads firmware images from here.
		mux.HandleFunc("GET /files/{path...}", h.serveFile)
	}
	if withWS {
		mux.HandleFunc("GET "+WebSocketPath, h.serveWebSocket)
	}
	return mux
}

// authorize admits requests that carry a valid service SAS token: signed
// with the hub's policy key, for the hub's host, not expired. Any other
// request is answered 401 from its headers alone and its connection
// closed: the hub reads no body from a client it does not know, so a
// client cannot hold a connection by trickling one.
func (h *Hub) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := h.checkServiceToken(r.Header.Get("Authorization"), time.Now()); err != nil {
			h.log.Info("service request refused", zap.String("path", r.URL.Path), zap.String("remote", r.RemoteAddr), zap.Error(err))
			w.Header().Set("Connection", "close") // HTTP/2: GOAWAY
			writeError(w, errf(http.StatusUnauthorized, codeUnauthorizedAccess, "Unauthorized: %v", err))
			// After the handler, the server would read up to 256 KB of the
			// unread body to reuse the connection; a deadline in the past
			// makes that read fail at once.
			_ = http.NewResponseController(w).SetReadDeadline(time.Now())
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (h *Hub) checkServiceToken(header string, now time.Time) error {
	if header == "" {
		return errors.New("no Authorization header")
	}
	tok, err := iothub.ParseSAS(header)
	if err != nil {
		return err
	}
	if tok.KeyName != ServicePolicy {
		return errors.New("unknown shared access policy " + strconv.Quote(tok.KeyName))
	}
	if !tok.Covers(h.cfg.HostName) {
		return errors.New("token resource " + strconv.Quote(tok.Resource) + " is not this hub")
	}
	if err := tok.Verify(h.svcKey); err != nil {
		return err
	}
	if tok.Expired(now) {
		return iothub.ErrSASExpired
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, errf(http.StatusInternalServerError, iothub.CodeServerError, "internal error"))
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func writeError(w http.ResponseWriter, e *svcError) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	if name, ok := errorNames[e.code]; ok {
		w.Header().Set("iothub-errorcode", name)
	}
	w.WriteHeader(e.status)
	_, _ = w.Write(iothub.ErrorBody(e.code, e.msg, e.info))
}

// readBody reads a bounded request body.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, *svcError) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errf(http.StatusRequestEntityTooLarge, iothub.CodeMessageTooLarge, "Request body is over %d bytes", maxBody)
		}
		return nil, errf(http.StatusBadRequest, iothub.CodeIotHubFormatError, "Request body could not be read: %v", err)
	}
	return b, nil
}

func (h *Hub) handleListDevices(w http.ResponseWriter, _ *http.Request) {
	devs := h.store.list()
	out := make([]iothub.Device, 0, len(devs))
	for _, d := range devs {
		out = append(out, h.deviceView(d.id, d))
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Hub) handlePutDevice(w http.ResponseWriter, r *http.Request) {
	b, serr := readBody(w, r)
	if serr != nil {
		writeError(w, serr)
		return
	}
	var in iothub.Device
	if len(b) > 0 {
		if err := json.Unmarshal(b, &in); err != nil {
			writeError(w, errf(http.StatusBadRequest, iothub.CodeIotHubFormatError, "Device body is not valid: %v", err))
			return
		}
	}
	dv, serr := h.putDevice(in, r.PathValue("id"), r.Header.Get("If-Match"))
	if serr != nil {
		writeError(w, serr)
		return
	}
	w.Header().Set("ETag", strconv.Quote(dv.ETag))
	writeJSON(w, http.StatusOK, dv)
}

func (h *Hub) handleGetDevice(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	d := h.store.get(id)
	if d == nil {
		writeError(w, deviceNotFound(id))
		return
	}
	dv := h.deviceView(id, d)
	w.Header().Set("ETag", strconv.Quote(dv.ETag))
	writeJSON(w, http.StatusOK, dv)
}

func (h *Hub) handleDeleteDevice(w http.ResponseWriter, r *http.Request) {
	if serr := h.deleteDevice(r.PathValue("id"), r.Header.Get("If-Match")); serr != nil {
		writeError(w, serr)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *Hub) handleGetTwin(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	t, err := h.Twin(id)
	if err != nil {
		writeError(w, deviceNotFound(id))
		return
	}
	w.Header().Set("ETag", strconv.Quote(t.ETag))
	writeJSON(w, http.StatusOK, t)
}

func (h *Hub) handleUpdateTwin(w http.ResponseWriter, r *http.Request) {
	b, serr := readBody(w, r)
	if serr != nil {
		writeError(w, serr)
		return
	}
	if !h.throttle.allow() {
		w.Header().Set("Retry-After", "1") // the limiter's bucket holds one second
		writeError(w, errThrottled())
		return
	}
	t, serr := h.updateTwin(r.PathValue("id"), b, r.Header.Get("If-Match"), r.Method == http.MethodPut)
	if serr != nil {
		writeError(w, serr)
		return
	}
	h.throttle.done(time.Now())
	w.Header().Set("ETag", strconv.Quote(t.ETag))
	writeJSON(w, http.StatusOK, t)
}

func (h *Hub) handleInvoke(w http.ResponseWriter, r *http.Request) {
	b, serr := readBody(w, r)
	if serr != nil {
		writeError(w, serr)
		return
	}
	var req iothub.MethodRequest
	if err := json.Unmarshal(b, &req); err != nil {
		writeError(w, errf(http.StatusBadRequest, iothub.CodeIotHubFormatError, "Method request is not valid JSON: %v", err))
		return
	}
	res, serr := h.invoke(r.Context(), r.PathValue("id"), req)
	if serr != nil {
		writeError(w, serr)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// queryRequest is the body of POST /devices/query.
type queryRequest struct {
	Query string `json:"query"`
}

// handleQuery answers SELECT * FROM devices [WHERE …] with a JSON array of
// twins, paged by x-ms-max-item-count and x-ms-continuation.
func (h *Hub) handleQuery(w http.ResponseWriter, r *http.Request) {
	b, serr := readBody(w, r)
	if serr != nil {
		writeError(w, serr)
		return
	}
	var req queryRequest
	if err := json.Unmarshal(b, &req); err != nil {
		writeError(w, errf(http.StatusBadRequest, iothub.CodeIotHubFormatError, "Query request is not valid JSON: %v", err))
		return
	}
	q, err := ParseQuery(req.Query)
	if err != nil {
		writeError(w, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid, "%v", err))
		return
	}
	pg, serr := parsePage(r)
	if serr != nil {
		writeError(w, serr)
		return
	}
	var matches []json.RawMessage
	itemType := "Twin"
	if q.Jobs {
		matches, err = h.deviceJobDocs()
		if err == nil && q.Where != nil {
			matches, err = filterDocs(q, matches)
		}
		itemType = "DeviceJob"
	} else {
		matches, err = h.query(q)
	}
	if err != nil {
		writeError(w, errf(http.StatusInternalServerError, iothub.CodeServerError, "internal error"))
		return
	}
	if q.Top > 0 && len(matches) > q.Top {
		matches = matches[:q.Top]
	}
	writePage(w, pg, matches, itemType)
}

// page is where a paged answer starts and how many items it holds at
// most: x-ms-continuation (an opaque token; here the base64 of an offset)
// and x-ms-max-item-count (1..1000, default 100).
type page struct{ offset, size int }

func parsePage(r *http.Request) (page, *svcError) {
	p := page{size: 100}
	if v := r.Header.Get("x-ms-max-item-count"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			return p, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid, "x-ms-max-item-count must be 1..1000")
		}
		p.size = n
	}
	if v := r.Header.Get("x-ms-continuation"); v != "" {
		raw, err := base64.StdEncoding.DecodeString(v)
		n, err2 := strconv.Atoi(string(raw))
		if err != nil || err2 != nil || n < 0 {
			return p, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid, "x-ms-continuation is not valid")
		}
		p.offset = n
	}
	return p, nil
}

// writePage answers with p's page of items, and a continuation token
// when more follow.
func writePage[T any](w http.ResponseWriter, p page, items []T, itemType string) {
	offset := min(p.offset, len(items))
	end := min(offset+p.size, len(items))
	if end < len(items) {
		w.Header().Set("x-ms-continuation", base64.StdEncoding.EncodeToString([]byte(strconv.Itoa(end))))
	}
	w.Header().Set("x-ms-item-type", itemType)
	writeJSON(w, http.StatusOK, items[offset:end])
}

// filterDocs keeps the documents that match q.
func filterDocs(q *Query, docs []json.RawMessage) ([]json.RawMessage, error) {
	out := []json.RawMessage{}
	for _, b := range docs {
		doc, err := decodeAny(b)
		if err != nil {
			return nil, err
		}
		if q.Match(doc) {
			out = append(out, b)
		}
	}
	return out, nil
}

// query evaluates q over every twin, ordered by device id.
func (h *Hub) query(q *Query) ([]json.RawMessage, error) {
	out := []json.RawMessage{}
	for _, d := range h.store.list() {
		cs := h.connState(d.id, d)
		d.mu.Lock()
		deleted := d.deleted
		t := d.twinView(cs)
		d.mu.Unlock()
		if deleted {
			continue
		}
		b, err := json.Marshal(t)
		if err != nil {
			return nil, err
		}
		if q.Where == nil {
			out = append(out, b)
			continue
		}
		doc, err := decodeAny(b)
		if err != nil {
			return nil, err
		}
		if q.Match(doc) {
			out = append(out, b)
		}
	}
	return out, nil
}

func (h *Hub) handlePutJob(w http.ResponseWriter, r *http.Request) {
	b, serr := readBody(w, r)
	if serr != nil {
		writeError(w, serr)
		return
	}
	answerJob(w)(h.scheduleJob(r.PathValue("id"), b))
}

func (h *Hub) handleGetJob(w http.ResponseWriter, r *http.Request) {
	answerJob(w)(h.getJob(r.PathValue("id")))
}

func (h *Hub) handleCancelJob(w http.ResponseWriter, r *http.Request) {
	answerJob(w)(h.cancelJob(r.PathValue("id")))
}

// answerJob returns what answers a job request: the job (200) or the
// error.
func answerJob(w http.ResponseWriter) func(v any, serr *svcError) {
	return func(v any, serr *svcError) {
		if serr != nil {
			writeError(w, serr)
			return
		}
		writeJSON(w, http.StatusOK, v)
	}
}

// handleListJobs answers GET /jobs/v2/query?jobType=&jobStatus=, paged like
// the device query.
func (h *Hub) handleListJobs(w http.ResponseWriter, r *http.Request) {
	jobType, status := r.URL.Query().Get("jobType"), r.URL.Query().Get("jobStatus")
	if jobType != "" && jobType != JobTypeDeviceMethod && jobType != JobTypeUpdateTwin {
		writeError(w, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid, "jobType %q is not a job type", jobType))
		return
	}
	all := h.listJobs(jobType, status)
	pg, serr := parsePage(r)
	if serr != nil {
		writeError(w, serr)
		return
	}
	writePage(w, pg, all, "JobResponse")
}
