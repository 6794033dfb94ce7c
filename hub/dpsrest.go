package hub

import (
	"encoding/json"
	"errors"
	"net/http"
	"sort"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/dps"
)

// dpsRoutes adds the DPS service API (individual enrollments, enrollment
// groups, registration states) to mux, behind the provisioningserviceowner
// policy.
func (h *Hub) dpsRoutes(mux *http.ServeMux) {
	api := http.NewServeMux()
	en := enrollmentHandlers[dps.IndividualEnrollment]{h: h, k: &individualEnrollments}
	api.HandleFunc("PUT /enrollments/{id}", en.put)
	api.HandleFunc("GET /enrollments/{id}", en.get)
	api.HandleFunc("DELETE /enrollments/{id}", en.delete)
	api.HandleFunc("POST /enrollments/query", en.query)
	api.HandleFunc("GET /enrollments/{id}/attestationmechanism", en.attestation)
	api.HandleFunc("POST /enrollments/{id}/attestationmechanism", en.attestation)
	gr := enrollmentHandlers[dps.EnrollmentGroup]{h: h, k: &enrollmentGroups}
	api.HandleFunc("PUT /enrollmentGroups/{id}", gr.put)
	api.HandleFunc("GET /enrollmentGroups/{id}", gr.get)
	api.HandleFunc("DELETE /enrollmentGroups/{id}", gr.delete)
	api.HandleFunc("POST /enrollmentGroups/query", gr.query)
	api.HandleFunc("POST /enrollmentGroups/{id}/attestationmechanism", gr.attestation)
	api.HandleFunc("GET /registrations/{id}", h.handleGetRegistration)
	api.HandleFunc("DELETE /registrations/{id}", h.handleDeleteRegistration)
	api.HandleFunc("POST /registrations/{id}/query", h.handleQueryGroupRegistrations)
	auth := h.authorizeDPS(api)
	mux.Handle("/enrollments/", auth)
	mux.Handle("/enrollmentGroups/", auth)
	mux.Handle("/registrations/", auth)
}

// authorizeDPS admits requests with a SAS token of the DPS policy.
func (h *Hub) authorizeDPS(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := h.checkDPSToken(r.Header.Get("Authorization"), time.Now()); err != nil {
			h.log.Info("DPS service request refused", zap.String("path", r.URL.Path), zap.String("remote", r.RemoteAddr), zap.Error(err))
			w.Header().Set("Connection", "close")
			writeDPSError(w, http.StatusUnauthorized, dps.CodeUnauthorized, "Unauthorized: "+err.Error())
			_ = http.NewResponseController(w).SetReadDeadline(time.Now())
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (h *Hub) checkDPSToken(header string, now time.Time) error {
	if header == "" {
		return errors.New("no Authorization header")
	}
	tok, err := iothub.ParseSAS(header)
	if err != nil {
		return err
	}
	if tok.KeyName != dps.ServicePolicy {
		return errors.New("unknown shared access policy " + strconv.Quote(tok.KeyName))
	}
	if !tok.Covers(h.cfg.HostName) {
		return errors.New("token resource " + strconv.Quote(tok.Resource) + " is not this provisioning service")
	}
	if err := tok.Verify(h.dps.key); err != nil {
		return err
	}
	if tok.Expired(now) {
		return iothub.ErrSASExpired
	}
	return nil
}

func writeDPSError(w http.ResponseWriter, status, code int, msg string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(dps.ErrorBody(code, msg, time.Now()))
}

func writeDPS(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeDPSError(w, http.StatusInternalServerError, dps.CodeInternal, "internal error")
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// decodeDPS reads a bounded JSON body into v; it answers the error itself.
func decodeDPS(w http.ResponseWriter, r *http.Request, v any) bool {
	b, serr := readBody(w, r)
	if serr == nil {
		if err := json.Unmarshal(b, v); err != nil {
			writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, "Body is not valid: "+err.Error())
			return false
		}
		return true
	}
	writeDPSError(w, serr.status, dps.CodeBadRequest, serr.msg)
	return false
}

// checkAttestation validates an attestation, generating the symmetric
// keys that are missing, as DPS does (X.509: dpsx509.go).
func checkAttestation(a *dps.AttestationMechanism, group bool) (string, bool) {
	switch a.Type {
	case dps.AttestationSymmetricKey:
	case dps.AttestationX509:
		return checkX509Attestation(a, group)
	case "":
		return "attestation.type is required", false
	default:
		return "attestation type " + strconv.Quote(a.Type) + " is not supported by this hub (symmetricKey or x509)", false
	}
	if a.SymmetricKey == nil {
		a.SymmetricKey = &dps.SymmetricKey{}
	}
	if a.SymmetricKey.PrimaryKey == "" {
		a.SymmetricKey.PrimaryKey = newKey()
	}
	if a.SymmetricKey.SecondaryKey == "" {
		a.SymmetricKey.SecondaryKey = newKey()
	}
	if !validKey(a.SymmetricKey.PrimaryKey) || !validKey(a.SymmetricKey.SecondaryKey) {
		return "symmetric keys must be base64 keys of 16 to 64 bytes", false
	}
	return "", true
}

func validStatus(s *string) bool {
	if *s == "" {
		*s = "enabled"
	}
	return *s == "enabled" || *s == "disabled"
}

// etagCheck answers 412 when If-Match names another version.
func etagCheck(w http.ResponseWriter, r *http.Request, have string) bool {
	m := r.Header.Get("If-Match")
	if m == "" || m == "*" || have == "" || m == have || strconv.Quote(m) == have {
		return true
	}
	writeDPSError(w, http.StatusPreconditionFailed, dps.CodePreconditionFailed, "The etag "+m+" does not match "+have)
	return false
}

// enrollmentKind is what the handlers of individual enrollments and of
// enrollment groups differ in; the handlers themselves are one generic
// implementation (enrollmentHandlers).
type enrollmentKind[T any] struct {
	what     string // "Enrollment", "Enrollment group": error messages
	idName   string // "Registration id", "Enrollment group id": an invalid id in the path
	idField  string // the JSON field of the id in the body
	logWhat  string // "DPS enrollment", "DPS enrollment group"
	logField string // the log field of the id
	group    bool   // enrollment groups: an X.509 attestation holds a CA
	records  func(*dpsData) map[string]*T
	fields   func(*T) enrollmentFields
	// validate checks what only this kind has (an enrollment's device id);
	// nil: nothing.
	validate func(*T) (string, bool)
	// strip drops from a record to store what the service computes (an
	// enrollment's registration state); nil: nothing.
	strip func(*T)
	// view is the record as the API returns it, the store's s.mu held.
	view func(s *dpsServer, rec *T) T
}

// enrollmentFields points into the fields the two record types share.
type enrollmentFields struct {
	id, etag, status, created, updated *string
	attestation                        *dps.AttestationMechanism
}

var individualEnrollments = enrollmentKind[dps.IndividualEnrollment]{
	what: "Enrollment", idName: "Registration id", idField: "registrationId",
	logWhat: "DPS enrollment", logField: "registration_id",
	records: func(d *dpsData) map[string]*dps.IndividualEnrollment { return d.Enrollments },
	fields: func(e *dps.IndividualEnrollment) enrollmentFields {
		return enrollmentFields{id: &e.RegistrationID, etag: &e.ETag, status: &e.ProvisioningStatus,
			created: &e.CreatedDateTimeUTC, updated: &e.LastUpdatedTimeUTC, attestation: &e.Attestation}
	},
	validate: func(e *dps.IndividualEnrollment) (string, bool) {
		if e.DeviceID != "" && !iothub.ValidDeviceID(e.DeviceID) {
			return "Device id " + strconv.Quote(e.DeviceID) + " is not valid", false
		}
		return "", true
	},
	strip: func(e *dps.IndividualEnrollment) { e.RegistrationState = nil },
	view:  (*dpsServer).enrollmentViewLocked,
}

var enrollmentGroups = enrollmentKind[dps.EnrollmentGroup]{
	what: "Enrollment group", idName: "Enrollment group id", idField: "enrollmentGroupId",
	logWhat: "DPS enrollment group", logField: "enrollment_group", group: true,
	records: func(d *dpsData) map[string]*dps.EnrollmentGroup { return d.Groups },
	fields: func(g *dps.EnrollmentGroup) enrollmentFields {
		return enrollmentFields{id: &g.EnrollmentGroupID, etag: &g.ETag, status: &g.ProvisioningStatus,
			created: &g.CreatedDateTimeUTC, updated: &g.LastUpdatedTimeUTC, attestation: &g.Attestation}
	},
	view: func(_ *dpsServer, g *dps.EnrollmentGroup) dps.EnrollmentGroup { return *g },
}

func (s *dpsServer) enrollmentViewLocked(e *dps.IndividualEnrollment) dps.IndividualEnrollment {
	out := *e
	if reg := s.data.Registrations[e.RegistrationID]; reg != nil && reg.GroupID == "" {
		st := reg.State
		out.RegistrationState = &st
	}
	return out
}

// enrollmentHandlers serves one kind of enrollment: create or replace
// (with If-Match), get, its attestation, delete (with If-Match) and query.
type enrollmentHandlers[T any] struct {
	h *Hub
	k *enrollmentKind[T]
}

func (e enrollmentHandlers[T]) put(w http.ResponseWriter, r *http.Request) {
	k := e.k
	id := r.PathValue("id")
	var in T
	if !decodeDPS(w, r, &in) {
		return
	}
	f := k.fields(&in)
	switch {
	case !dps.ValidRegistrationID(id):
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, k.idName+" "+strconv.Quote(id)+" is not valid")
		return
	case *f.id != "" && *f.id != id:
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, k.idField+" in the body does not match the path")
		return
	}
	if k.validate != nil {
		if msg, ok := k.validate(&in); !ok {
			writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, msg)
			return
		}
	}
	if !validStatus(f.status) {
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, "provisioningStatus must be enabled or disabled")
		return
	}
	if msg, ok := checkAttestation(f.attestation, k.group); !ok {
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, msg)
		return
	}
	s := e.h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	records := k.records(&s.data)
	now := time.Now().UTC().Format(time.RFC3339Nano)
	*f.id, *f.created, *f.updated = id, now, now
	prev := records[id]
	if prev != nil {
		pf := k.fields(prev)
		if !etagCheck(w, r, *pf.etag) {
			return
		}
		*f.created = *pf.created
	}
	*f.etag = strconv.Quote(newOperationID())
	if k.strip != nil {
		k.strip(&in)
	}
	records[id] = &in
	if err := s.saveLocked(); err != nil {
		if prev != nil {
			records[id] = prev
		} else {
			delete(records, id)
		}
		writeDPSError(w, http.StatusInternalServerError, dps.CodeInternal, "internal error")
		return
	}
	e.h.log.Info(k.logWhat+" stored", zap.String(k.logField, id))
	writeDPS(w, http.StatusOK, k.view(s, &in))
}

// found returns the record named in the path, or answers 404; s.mu held.
func (e enrollmentHandlers[T]) found(w http.ResponseWriter, id string) *T {
	rec := e.k.records(&e.h.dps.data)[id]
	if rec == nil {
		writeDPSError(w, http.StatusNotFound, dps.CodeEnrollmentNotFound, e.k.what+" "+id+" not found")
	}
	return rec
}

func (e enrollmentHandlers[T]) get(w http.ResponseWriter, r *http.Request) {
	s := e.h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	if rec := e.found(w, r.PathValue("id")); rec != nil {
		writeDPS(w, http.StatusOK, e.k.view(s, rec))
	}
}

func (e enrollmentHandlers[T]) attestation(w http.ResponseWriter, r *http.Request) {
	s := e.h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	if rec := e.found(w, r.PathValue("id")); rec != nil {
		writeDPS(w, http.StatusOK, *e.k.fields(rec).attestation)
	}
}

func (e enrollmentHandlers[T]) delete(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s := e.h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	rec := e.found(w, id)
	if rec == nil {
		return
	}
	if !etagCheck(w, r, *e.k.fields(rec).etag) {
		return
	}
	records := e.k.records(&s.data)
	delete(records, id)
	if err := s.saveLocked(); err != nil {
		records[id] = rec
		writeDPSError(w, http.StatusInternalServerError, dps.CodeInternal, "internal error")
		return
	}
	e.h.log.Info(e.k.logWhat+" deleted", zap.String(e.k.logField, id))
	w.WriteHeader(http.StatusNoContent)
}

func (e enrollmentHandlers[T]) query(w http.ResponseWriter, r *http.Request) {
	var q dps.QuerySpecification
	if !decodeDPS(w, r, &q) {
		return
	}
	s := e.h.dps
	s.mu.Lock()
	records := e.k.records(&s.data)
	out := make([]T, 0, len(records))
	for _, rec := range records {
		out = append(out, e.k.view(s, rec))
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return *e.k.fields(&out[i]).id < *e.k.fields(&out[j]).id })
	w.Header().Set("x-ms-item-type", "Enrollment")
	writeDPS(w, http.StatusOK, out)
}

func (h *Hub) handleGetRegistration(w http.ResponseWriter, r *http.Request) {
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	reg := s.data.Registrations[r.PathValue("id")]
	if reg == nil {
		writeDPSError(w, http.StatusNotFound, dps.CodeNotFound, "Registration "+r.PathValue("id")+" not found")
		return
	}
	writeDPS(w, http.StatusOK, reg.State)
}

func (h *Hub) handleDeleteRegistration(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	reg := s.data.Registrations[id]
	if reg == nil {
		writeDPSError(w, http.StatusNotFound, dps.CodeNotFound, "Registration "+id+" not found")
		return
	}
	if !etagCheck(w, r, reg.State.ETag) {
		return
	}
	delete(s.data.Registrations, id)
	if err := s.saveLocked(); err != nil {
		s.data.Registrations[id] = reg
		writeDPSError(w, http.StatusInternalServerError, dps.CodeInternal, "internal error")
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// handleQueryGroupRegistrations lists the registration states of a group.
func (h *Hub) handleQueryGroupRegistrations(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s := h.dps
	s.mu.Lock()
	out := []dps.RegistrationState{}
	for _, reg := range s.data.Registrations {
		if reg.GroupID == id {
			out = append(out, reg.State)
		}
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].RegistrationID < out[j].RegistrationID })
	w.Header().Set("x-ms-item-type", "DeviceRegistration")
	writeDPS(w, http.StatusOK, out)
}
