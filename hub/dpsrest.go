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
	api.HandleFunc("PUT /enrollments/{id}", h.handlePutEnrollment)
	api.HandleFunc("GET /enrollments/{id}", h.handleGetEnrollment)
	api.HandleFunc("DELETE /enrollments/{id}", h.handleDeleteEnrollment)
	api.HandleFunc("POST /enrollments/query", h.handleQueryEnrollments)
	api.HandleFunc("GET /enrollments/{id}/attestationmechanism", h.handleEnrollmentAttestation)
	api.HandleFunc("POST /enrollments/{id}/attestationmechanism", h.handleEnrollmentAttestation)
	api.HandleFunc("PUT /enrollmentGroups/{id}", h.handlePutGroup)
	api.HandleFunc("GET /enrollmentGroups/{id}", h.handleGetGroup)
	api.HandleFunc("DELETE /enrollmentGroups/{id}", h.handleDeleteGroup)
	api.HandleFunc("POST /enrollmentGroups/query", h.handleQueryGroups)
	api.HandleFunc("POST /enrollmentGroups/{id}/attestationmechanism", h.handleGroupAttestation)
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

func (h *Hub) handlePutEnrollment(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var in dps.IndividualEnrollment
	if !decodeDPS(w, r, &in) {
		return
	}
	switch {
	case !dps.ValidRegistrationID(id):
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, "Registration id "+strconv.Quote(id)+" is not valid")
		return
	case in.RegistrationID != "" && in.RegistrationID != id:
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, "registrationId in the body does not match the path")
		return
	case in.DeviceID != "" && !iothub.ValidDeviceID(in.DeviceID):
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, "Device id "+strconv.Quote(in.DeviceID)+" is not valid")
		return
	case !validStatus(&in.ProvisioningStatus):
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, "provisioningStatus must be enabled or disabled")
		return
	}
	if msg, ok := checkAttestation(&in.Attestation, false); !ok {
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, msg)
		return
	}
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now().UTC().Format(time.RFC3339Nano)
	in.RegistrationID, in.CreatedDateTimeUTC, in.LastUpdatedTimeUTC = id, now, now
	prev := s.data.Enrollments[id]
	if prev != nil {
		if !etagCheck(w, r, prev.ETag) {
			return
		}
		in.CreatedDateTimeUTC = prev.CreatedDateTimeUTC
	}
	in.ETag = strconv.Quote(newOperationID())
	in.RegistrationState = nil
	s.data.Enrollments[id] = &in
	if err := s.saveLocked(); err != nil {
		if prev != nil {
			s.data.Enrollments[id] = prev
		} else {
			delete(s.data.Enrollments, id)
		}
		writeDPSError(w, http.StatusInternalServerError, dps.CodeInternal, "internal error")
		return
	}
	h.log.Info("DPS enrollment stored", zap.String("registration_id", id))
	writeDPS(w, http.StatusOK, s.enrollmentViewLocked(&in))
}

func (s *dpsServer) enrollmentViewLocked(e *dps.IndividualEnrollment) dps.IndividualEnrollment {
	out := *e
	if reg := s.data.Registrations[e.RegistrationID]; reg != nil && reg.GroupID == "" {
		st := reg.State
		out.RegistrationState = &st
	}
	return out
}

func (h *Hub) handleGetEnrollment(w http.ResponseWriter, r *http.Request) {
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.data.Enrollments[r.PathValue("id")]
	if e == nil {
		writeDPSError(w, http.StatusNotFound, dps.CodeEnrollmentNotFound, "Enrollment "+r.PathValue("id")+" not found")
		return
	}
	writeDPS(w, http.StatusOK, s.enrollmentViewLocked(e))
}

func (h *Hub) handleEnrollmentAttestation(w http.ResponseWriter, r *http.Request) {
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.data.Enrollments[r.PathValue("id")]
	if e == nil {
		writeDPSError(w, http.StatusNotFound, dps.CodeEnrollmentNotFound, "Enrollment "+r.PathValue("id")+" not found")
		return
	}
	writeDPS(w, http.StatusOK, e.Attestation)
}

func (h *Hub) handleDeleteEnrollment(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.data.Enrollments[id]
	if e == nil {
		writeDPSError(w, http.StatusNotFound, dps.CodeEnrollmentNotFound, "Enrollment "+id+" not found")
		return
	}
	if !etagCheck(w, r, e.ETag) {
		return
	}
	delete(s.data.Enrollments, id)
	if err := s.saveLocked(); err != nil {
		s.data.Enrollments[id] = e
		writeDPSError(w, http.StatusInternalServerError, dps.CodeInternal, "internal error")
		return
	}
	h.log.Info("DPS enrollment deleted", zap.String("registration_id", id))
	w.WriteHeader(http.StatusNoContent)
}

func (h *Hub) handleQueryEnrollments(w http.ResponseWriter, r *http.Request) {
	var q dps.QuerySpecification
	if !decodeDPS(w, r, &q) {
		return
	}
	s := h.dps
	s.mu.Lock()
	out := make([]dps.IndividualEnrollment, 0, len(s.data.Enrollments))
	for _, e := range s.data.Enrollments {
		out = append(out, s.enrollmentViewLocked(e))
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].RegistrationID < out[j].RegistrationID })
	w.Header().Set("x-ms-item-type", "Enrollment")
	writeDPS(w, http.StatusOK, out)
}

func (h *Hub) handlePutGroup(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var in dps.EnrollmentGroup
	if !decodeDPS(w, r, &in) {
		return
	}
	switch {
	case !dps.ValidRegistrationID(id):
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, "Enrollment group id "+strconv.Quote(id)+" is not valid")
		return
	case in.EnrollmentGroupID != "" && in.EnrollmentGroupID != id:
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, "enrollmentGroupId in the body does not match the path")
		return
	case !validStatus(&in.ProvisioningStatus):
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, "provisioningStatus must be enabled or disabled")
		return
	}
	if msg, ok := checkAttestation(&in.Attestation, true); !ok {
		writeDPSError(w, http.StatusBadRequest, dps.CodeBadRequest, msg)
		return
	}
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now().UTC().Format(time.RFC3339Nano)
	in.EnrollmentGroupID, in.CreatedDateTimeUTC, in.LastUpdatedTimeUTC = id, now, now
	prev := s.data.Groups[id]
	if prev != nil {
		if !etagCheck(w, r, prev.ETag) {
			return
		}
		in.CreatedDateTimeUTC = prev.CreatedDateTimeUTC
	}
	in.ETag = strconv.Quote(newOperationID())
	s.data.Groups[id] = &in
	if err := s.saveLocked(); err != nil {
		if prev != nil {
			s.data.Groups[id] = prev
		} else {
			delete(s.data.Groups, id)
		}
		writeDPSError(w, http.StatusInternalServerError, dps.CodeInternal, "internal error")
		return
	}
	h.log.Info("DPS enrollment group stored", zap.String("enrollment_group", id))
	writeDPS(w, http.StatusOK, in)
}

func (h *Hub) handleGetGroup(w http.ResponseWriter, r *http.Request) {
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.data.Groups[r.PathValue("id")]
	if g == nil {
		writeDPSError(w, http.StatusNotFound, dps.CodeEnrollmentNotFound, "Enrollment group "+r.PathValue("id")+" not found")
		return
	}
	writeDPS(w, http.StatusOK, g)
}

func (h *Hub) handleGroupAttestation(w http.ResponseWriter, r *http.Request) {
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.data.Groups[r.PathValue("id")]
	if g == nil {
		writeDPSError(w, http.StatusNotFound, dps.CodeEnrollmentNotFound, "Enrollment group "+r.PathValue("id")+" not found")
		return
	}
	writeDPS(w, http.StatusOK, g.Attestation)
}

func (h *Hub) handleDeleteGroup(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s := h.dps
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.data.Groups[id]
	if g == nil {
		writeDPSError(w, http.StatusNotFound, dps.CodeEnrollmentNotFound, "Enrollment group "+id+" not found")
		return
	}
	if !etagCheck(w, r, g.ETag) {
		return
	}
	delete(s.data.Groups, id)
	if err := s.saveLocked(); err != nil {
		s.data.Groups[id] = g
		writeDPSError(w, http.StatusInternalServerError, dps.CodeInternal, "internal error")
		return
	}
	h.log.Info("DPS enrollment group deleted", zap.String("enrollment_group", id))
	w.WriteHeader(http.StatusNoContent)
}

func (h *Hub) handleQueryGroups(w http.ResponseWriter, r *http.Request) {
	var q dps.QuerySpecification
	if !decodeDPS(w, r, &q) {
		return
	}
	s := h.dps
	s.mu.Lock()
	out := make([]dps.EnrollmentGroup, 0, len(s.data.Groups))
	for _, g := range s.data.Groups {
		out = append(out, *g)
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].EnrollmentGroupID < out[j].EnrollmentGroupID })
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
