package hub

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/iothub"
)

// CreateDevice registers a device with generated SAS keys and returns its
// connection string. It fails with ErrDeviceExists if the id is taken.
func (h *Hub) CreateDevice(deviceID string) (string, error) {
	_, err := h.putDevice(iothub.Device{DeviceID: deviceID}, deviceID, "")
	if err != nil {
		if err.code == iothub.CodeDeviceAlreadyExists {
			return "", fmt.Errorf("%w: %s", ErrDeviceExists, deviceID)
		}
		return "", err.serviceError()
	}
	return h.DeviceConnectionString(deviceID)
}

// DeviceConnectionString returns the connection string of a SAS device
// (primary key), or an x509=true string for an X.509 device.
func (h *Hub) DeviceConnectionString(deviceID string) (string, error) {
	d := h.store.get(deviceID)
	if d == nil {
		return "", fmt.Errorf("%w: %s", ErrDeviceNotFound, deviceID)
	}
	d.mu.Lock()
	auth := d.rec.Auth
	d.mu.Unlock()
	cs := iothub.ConnectionString{HostName: h.cfg.HostName, DeviceID: deviceID}
	if auth.Type == iothub.AuthSAS {
		cs.SharedAccessKey = auth.PrimaryKey
	} else {
		cs.X509 = true
	}
	return cs.String(), nil
}

// Twin returns a device's twin as GET /twins/{id} does.
func (h *Hub) Twin(deviceID string) (iothub.Twin, error) {
	d := h.store.get(deviceID)
	if d == nil {
		return iothub.Twin{}, fmt.Errorf("%w: %s", ErrDeviceNotFound, deviceID)
	}
	cs := h.connState(deviceID, d)
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.twinView(cs), nil
}

// UpdateDesired merges patch into a device's desired properties, as PATCH
// /twins/{id} with {"properties":{"desired":patch}} does, notifies the
// device, and returns the new desired $version.
func (h *Hub) UpdateDesired(deviceID string, patch map[string]any) (int64, error) {
	b := marshalDoc(map[string]any{"properties": map[string]any{"desired": patch}})
	t, err := h.updateTwin(deviceID, b, "", false)
	if err != nil {
		return 0, err.serviceError()
	}
	v, _ := t.Properties.Desired["$version"].(int64)
	return v, nil
}

// connState reads a device's connection state. It must be called without
// d.mu held (lock order: sessMu is never taken under a device lock).
func (h *Hub) connState(id string, d *device) connState {
	s := h.session(id)
	d.mu.Lock()
	last := d.lastActivity
	d.mu.Unlock()
	return connState{connected: s != nil, lastActivity: last}
}

// validKey reports whether s is a base64 SAS key of a sensible length.
func validKey(s string) bool {
	b, err := base64.StdEncoding.DecodeString(s)
	return err == nil && len(b) >= 16 && len(b) <= 64
}

// validThumbprint accepts a SHA-1 or SHA-256 thumbprint in hex.
func validThumbprint(s string) bool {
	n := normalizeThumbprint(s)
	if len(n) != 40 && len(n) != 64 {
		return false
	}
	_, err := hex.DecodeString(n)
	return err == nil
}

// randomID makes a generationId: IoT Hub's are 18 decimal digits.
func randomID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("63%016d", binary.BigEndian.Uint64(b[:])%1e16)
}

// authFrom builds the stored authentication from a registry request,
// generating SAS keys that were not given. prev is the current one for an
// update, or nil.
func authFrom(a iothub.Authentication, prev *authData) (authData, *svcError) {
	typ := a.Type
	if typ == "" {
		typ = iothub.AuthSAS
		if prev != nil {
			typ = prev.Type
		}
	}
	switch typ {
	case iothub.AuthSAS:
		out := authData{Type: iothub.AuthSAS}
		if a.SymmetricKey != nil {
			out.PrimaryKey, out.SecondaryKey = a.SymmetricKey.PrimaryKey, a.SymmetricKey.SecondaryKey
		}
		if out.PrimaryKey == "" && out.SecondaryKey == "" && prev != nil && prev.Type == iothub.AuthSAS {
			out.PrimaryKey, out.SecondaryKey = prev.PrimaryKey, prev.SecondaryKey
		}
		if out.PrimaryKey == "" {
			out.PrimaryKey = newKey()
		}
		if out.SecondaryKey == "" {
			out.SecondaryKey = newKey()
		}
		if !validKey(out.PrimaryKey) || !validKey(out.SecondaryKey) {
			return authData{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid,
				"The provided symmetric keys are not valid base64 keys of 16 to 64 bytes")
		}
		return out, nil
	case iothub.AuthSelfSigned:
		out := authData{Type: iothub.AuthSelfSigned}
		if a.X509Thumbprint != nil {
			out.PrimaryThumbprint = normalizeThumbprint(a.X509Thumbprint.PrimaryThumbprint)
			out.SecondaryThumbprint = normalizeThumbprint(a.X509Thumbprint.SecondaryThumbprint)
		}
		if out.PrimaryThumbprint == "" && out.SecondaryThumbprint == "" {
			return authData{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid, "A selfSigned device needs a thumbprint")
		}
		for _, t := range []string{out.PrimaryThumbprint, out.SecondaryThumbprint} {
			if t != "" && !validThumbprint(t) {
				return authData{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid,
					"Thumbprint %q is not a SHA-1 or SHA-256 hex digest", t)
			}
		}
		return out, nil
	default:
		return authData{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid,
			"Authentication type %q is not supported by this hub (use sas or selfSigned)", typ)
	}
}

// putDevice creates or (with ifMatch) updates a device identity.
func (h *Hub) putDevice(in iothub.Device, id, ifMatch string) (iothub.Device, *svcError) {
	if !iothub.ValidDeviceID(id) {
		return iothub.Device{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid, "Device id %q is not valid", id)
	}
	if in.DeviceID != "" && in.DeviceID != id {
		return iothub.Device{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid,
			"Device id %q in the body does not match %q in the path", in.DeviceID, id)
	}
	status := in.Status
	if status != "" && status != "enabled" && status != "disabled" {
		return iothub.Device{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid, "Status %q is not enabled or disabled", status)
	}
	now := time.Now()
	for {
		d := h.store.get(id)
		if d == nil {
			if ifMatch != "" && ifMatch != "*" {
				return iothub.Device{}, deviceNotFound(id)
			}
			auth, err := authFrom(in.Authentication, nil)
			if err != nil {
				return iothub.Device{}, err
			}
			if status == "" {
				status = "enabled"
			}
			rec := record{
				DeviceID: id, GenerationID: randomID(), DeviceETag: 1, Status: status, StatusReason: in.StatusReason,
				StatusUpdatedTime: now, Auth: auth, Version: 1, DesiredVersion: 1, ReportedVersion: 1,
			}
			nd, serr := h.store.add(rec)
			if errors.Is(serr, errExists) {
				continue // created meanwhile: answer as for an existing device
			}
			if serr != nil {
				h.log.Error("device not stored", zap.String("device_id", id), zap.Error(serr))
				return iothub.Device{}, errf(http.StatusInternalServerError, iothub.CodeServerError, "internal error")
			}
			h.log.Info("device created", zap.String("device_id", id), zap.String("auth", auth.Type))
			return h.deviceView(id, nd), nil
		}
		if ifMatch == "" {
			return iothub.Device{}, errf(http.StatusConflict, iothub.CodeDeviceAlreadyExists, "A device with ID '%s' is already registered.", id)
		}
		d.mu.Lock()
		if d.deleted {
			d.mu.Unlock()
			continue
		}
		if !etagMatches(ifMatch, deviceETag(d.rec.DeviceETag)) {
			d.mu.Unlock()
			return iothub.Device{}, errf(http.StatusPreconditionFailed, iothub.CodePreconditionFailed,
				"The etag %s does not match the device's %s", ifMatch, deviceETag(d.rec.DeviceETag))
		}
		prev := d.rec.Auth
		auth, err := authFrom(in.Authentication, &prev)
		if err != nil {
			d.mu.Unlock()
			return iothub.Device{}, err
		}
		old := d.rec
		if status != "" && status != d.rec.Status {
			d.rec.Status, d.rec.StatusUpdatedTime = status, now
		}
		d.rec.StatusReason = in.StatusReason
		d.rec.Auth = auth
		d.rec.DeviceETag++
		if serr := d.save(); serr != nil {
			d.rec = old
			d.mu.Unlock()
			h.log.Error("device not stored", zap.String("device_id", id), zap.Error(serr))
			return iothub.Device{}, errf(http.StatusInternalServerError, iothub.CodeServerError, "internal error")
		}
		kick := d.rec.Status != "enabled" || auth != prev
		d.mu.Unlock()
		if kick {
			// New credentials or a disabled identity end the connection,
			// as they do at IoT Hub.
			if s := h.session(id); s != nil {
				s.cl.Stop(errDeviceRemoved)
			}
		}
		h.log.Info("device updated", zap.String("device_id", id))
		return h.deviceView(id, d), nil
	}
}

func (h *Hub) deviceView(id string, d *device) iothub.Device {
	cs := h.connState(id, d)
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.deviceView(cs, cs.lastActivity)
}

// deleteDevice removes a device identity and closes its connection.
func (h *Hub) deleteDevice(id, ifMatch string) *svcError {
	d := h.store.get(id)
	if d == nil {
		return deviceNotFound(id)
	}
	d.mu.Lock()
	if ifMatch != "" && !etagMatches(ifMatch, deviceETag(d.rec.DeviceETag)) {
		d.mu.Unlock()
		return errf(http.StatusPreconditionFailed, iothub.CodePreconditionFailed,
			"The etag %s does not match the device's %s", ifMatch, deviceETag(d.rec.DeviceETag))
	}
	err := h.store.remove(d)
	d.mu.Unlock()
	if err != nil {
		h.log.Error("device not removed", zap.String("device_id", id), zap.Error(err))
		return errf(http.StatusInternalServerError, iothub.CodeServerError, "internal error")
	}
	if s := h.session(id); s != nil {
		s.cl.Stop(errDeviceRemoved)
	}
	h.ClearTwinFaults(id)
	h.log.Info("device deleted", zap.String("device_id", id))
	return nil
}

// etagMatches compares an If-Match value with an etag: "*" (quoted or not)
// matches anything; quotes and a weak marker are ignored.
func etagMatches(ifMatch, etag string) bool {
	v := strings.TrimSpace(ifMatch)
	v = strings.TrimPrefix(v, "W/")
	// The Node service SDK sends a quoted star.
	v = strings.Trim(v, `"`)
	return v == "*" || v == etag
}

// updateTwin applies a PATCH (replace=false) or PUT (replace=true) of
// /twins/{id} and returns the new twin.
func (h *Hub) updateTwin(id string, body []byte, ifMatch string, replace bool) (iothub.Twin, *svcError) {
	u, err := decodeTwinUpdate(body)
	if err != nil {
		pe := err.(*patchError)
		return iothub.Twin{}, errf(pe.status, pe.code, "%s", pe.msg)
	}
	d := h.store.get(id)
	if d == nil {
		return iothub.Twin{}, deviceNotFound(id)
	}
	cs := h.connState(id, d)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.deleted {
		return iothub.Twin{}, deviceNotFound(id)
	}
	if ifMatch != "" && !etagMatches(ifMatch, twinETag(d.rec.Version)) {
		return iothub.Twin{}, errf(http.StatusPreconditionFailed, iothub.CodePreconditionFailed,
			"The etag %s does not match the twin's %s", ifMatch, twinETag(d.rec.Version))
	}
	ch, aerr := d.applyServiceUpdate(u, replace, time.Now())
	if aerr != nil {
		var pe *patchError
		if errors.As(aerr, &pe) {
			return iothub.Twin{}, errf(pe.status, pe.code, "%s", pe.msg)
		}
		h.log.Error("twin not stored", zap.String("device_id", id), zap.Error(aerr))
		return iothub.Twin{}, errf(http.StatusInternalServerError, iothub.CodeServerError, "internal error")
	}
	if ch != nil {
		// Sent under the device lock so notifications leave in version
		// order.
		h.notifyDesired(id, ch)
		h.log.Info("desired properties updated", zap.String("device_id", id), zap.Int64("version", ch.version))
	}
	return d.twinView(cs), nil
}
