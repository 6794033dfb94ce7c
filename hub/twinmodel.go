package hub

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/gwagent/gwagent/twin"

	"github.com/gwagent/gwagent/iothub"
)

// timeLayout is how IoT Hub writes times in service answers.
const timeLayout = "2006-01-02T15:04:05.0000000Z"

// zeroTime is IoT Hub's way of writing "never".
const zeroTime = "0001-01-01T00:00:00Z"

func formatTime(t time.Time) string {
	if t.IsZero() {
		return zeroTime
	}
	return t.UTC().Format(timeLayout)
}

// metaTime is the $lastUpdated format (ISO 8601 UTC with milliseconds).
func metaTime(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z") }

// twinETag is the twin's etag: IoT Hub writes the version as 8 big-endian
// bytes in base64 ("AAAAAAAAAAE=").
func twinETag(version int64) string {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(version))
	return base64.StdEncoding.EncodeToString(b[:])
}

// deviceETag is the device identity's etag: a counter in base64 ("MQ==").
func deviceETag(n int64) string {
	return base64.StdEncoding.EncodeToString([]byte(strconv.FormatInt(n, 10)))
}

// deepCopy copies a document so that a change can be checked before it is
// committed.
func deepCopy(doc map[string]any) map[string]any {
	out := make(map[string]any, len(doc))
	for k, v := range doc {
		out[k] = copyAny(v)
	}
	return out
}

func copyAny(v any) any {
	switch v := v.(type) {
	case map[string]any:
		return deepCopy(v)
	case []any:
		s := make([]any, len(v))
		for i, e := range v {
			s[i] = copyAny(e)
		}
		return s
	default:
		return v
	}
}

// touchMeta records in meta, the $metadata tree of a section, that patch was
// applied at ts: every object the patch touches gets $lastUpdated (and, for
// desired properties, $lastUpdatedVersion), every leaf it sets gets its own
// entry, and deleted members lose theirs. meta is changed in place.
func touchMeta(meta, patch map[string]any, ts string, version int64) {
	stamp(meta, ts, version)
	for k, pv := range patch {
		switch pv := pv.(type) {
		case nil:
			delete(meta, k)
		case map[string]any:
			child, _ := meta[k].(map[string]any)
			if child == nil {
				child = map[string]any{}
			}
			touchMeta(child, pv, ts, version)
			meta[k] = child
		default:
			leaf := map[string]any{}
			stamp(leaf, ts, version)
			meta[k] = leaf
		}
	}
}

func stamp(m map[string]any, ts string, version int64) {
	m["$lastUpdated"] = ts
	if version > 0 {
		m["$lastUpdatedVersion"] = version
	}
}

// sectionView is a section as the service reads it: the properties plus
// $metadata and $version.
func sectionView(doc, meta map[string]any, version int64) map[string]any {
	out := deepCopy(doc)
	out["$metadata"] = deepCopy(meta)
	out["$version"] = version
	return out
}

// deviceSectionView is a section as a device's GET returns it: the
// properties plus $version, no $metadata.
func deviceSectionView(doc map[string]any, version int64) map[string]any {
	out := make(map[string]any, len(doc)+1)
	for k, v := range doc {
		out[k] = v // read-only use while the caller holds the lock
	}
	out["$version"] = version
	return out
}

// connState is what the hub knows about a device's connection beyond its
// record.
type connState struct {
	connected    bool
	lastActivity time.Time
}

// twinView is the service's view of a device twin. The caller holds d.mu.
func (d *device) twinView(cs connState) iothub.Twin {
	r := &d.rec
	t := iothub.Twin{
		DeviceID:           r.DeviceID,
		ETag:               twinETag(r.Version),
		DeviceETag:         deviceETag(r.DeviceETag),
		Status:             r.Status,
		StatusUpdateTime:   formatTime(r.StatusUpdatedTime),
		ConnectionState:    connectionState(cs.connected),
		LastActivityTime:   formatTime(cs.lastActivity),
		AuthenticationType: r.Auth.Type,
		ModelID:            r.ModelID,
		Version:            r.Version,
		Tags:               deepCopy(r.Tags),
		Properties: iothub.TwinProperties{
			Desired:  sectionView(r.Desired, r.DesiredMeta, r.DesiredVersion),
			Reported: sectionView(r.Reported, r.ReportedMeta, r.ReportedVersion),
		},
		Capabilities: &iothub.Capabilities{},
	}
	if r.Auth.Type == iothub.AuthSelfSigned {
		t.X509Thumbprint = &iothub.X509Thumbprint{
			PrimaryThumbprint:   r.Auth.PrimaryThumbprint,
			SecondaryThumbprint: r.Auth.SecondaryThumbprint,
		}
	}
	return t
}

// deviceView is the registry's view of a device identity. The caller holds
// d.mu.
func (d *device) deviceView(cs connState, connChanged time.Time) iothub.Device {
	r := &d.rec
	dv := iothub.Device{
		DeviceID:                   r.DeviceID,
		GenerationID:               r.GenerationID,
		ETag:                       deviceETag(r.DeviceETag),
		Status:                     r.Status,
		StatusReason:               r.StatusReason,
		StatusUpdatedTime:          formatTime(r.StatusUpdatedTime),
		ConnectionState:            connectionState(cs.connected),
		ConnectionStateUpdatedTime: formatTime(connChanged),
		LastActivityTime:           formatTime(cs.lastActivity),
		Authentication:             iothub.Authentication{Type: r.Auth.Type},
		Capabilities:               &iothub.Capabilities{},
	}
	switch r.Auth.Type {
	case iothub.AuthSAS:
		dv.Authentication.SymmetricKey = &iothub.SymmetricKey{PrimaryKey: r.Auth.PrimaryKey, SecondaryKey: r.Auth.SecondaryKey}
		dv.Authentication.X509Thumbprint = &iothub.X509Thumbprint{}
	case iothub.AuthSelfSigned:
		dv.Authentication.SymmetricKey = &iothub.SymmetricKey{}
		dv.Authentication.X509Thumbprint = &iothub.X509Thumbprint{
			PrimaryThumbprint:   r.Auth.PrimaryThumbprint,
			SecondaryThumbprint: r.Auth.SecondaryThumbprint,
		}
	}
	return dv
}

func connectionState(connected bool) string {
	if connected {
		return "Connected"
	}
	return "Disconnected"
}

// patchError is a rejected twin change: the status and IoT Hub error code
// to answer with.
type patchError struct {
	status, code int
	msg          string
}

func (e *patchError) Error() string { return e.msg }

func invalid(format string, args ...any) *patchError {
	return &patchError{status: 400, code: iothub.CodeArgumentInvalid, msg: fmt.Sprintf(format, args...)}
}

// applyReported merges a device's reported patch. On success the record is
// changed and saved and the new reported $version is returned. The caller
// holds d.mu.
func (d *device) applyReported(patch map[string]any, now time.Time) (int64, error) {
	if err := twin.ValidatePatch(patch); err != nil {
		return 0, invalid("%v", err)
	}
	merged := twin.Merge(deepCopy(d.rec.Reported), patch)
	if n := twin.Size(merged); n > twin.MaxReportedSize {
		return 0, invalid("reported properties would be %d bytes, over the limit of %d", n, twin.MaxReportedSize)
	}
	meta := deepCopy(d.rec.ReportedMeta)
	touchMeta(meta, patch, metaTime(now), 0)

	old := d.rec
	d.rec.Reported, d.rec.ReportedMeta = merged, meta
	d.rec.ReportedVersion++
	d.rec.Version++
	if err := d.save(); err != nil {
		d.rec = old
		return 0, err
	}
	return d.rec.ReportedVersion, nil
}

// twinUpdate is a service change to tags and desired properties.
type twinUpdate struct {
	tags       map[string]any
	desired    map[string]any
	hasTags    bool
	hasDesired bool
}

// decodeTwinUpdate reads a PATCH or PUT /twins body. Read-only members of
// the twin (etag, version, deviceId, …) may be echoed back and are ignored;
// reported properties may not be written by the service.
func decodeTwinUpdate(b []byte) (twinUpdate, error) {
	doc, err := twin.Decode(b)
	if err != nil {
		return twinUpdate{}, &patchError{status: 400, code: iothub.CodeIotHubFormatError, msg: err.Error()}
	}
	var u twinUpdate
	if v, ok := doc["tags"]; ok && v != nil {
		m, ok := v.(map[string]any)
		if !ok {
			return twinUpdate{}, invalid("tags must be an object")
		}
		u.tags, u.hasTags = m, true
	}
	if v, ok := doc["properties"]; ok && v != nil {
		props, ok := v.(map[string]any)
		if !ok {
			return twinUpdate{}, invalid("properties must be an object")
		}
		if r, ok := props["reported"]; ok && r != nil {
			if m, _ := r.(map[string]any); len(stripReadOnly(m)) > 0 {
				return twinUpdate{}, invalid("reported properties cannot be changed by the service")
			}
		}
		if dv, ok := props["desired"]; ok && dv != nil {
			m, ok := dv.(map[string]any)
			if !ok {
				return twinUpdate{}, invalid("properties.desired must be an object")
			}
			u.desired, u.hasDesired = stripReadOnly(m), true
		}
	}
	if u.hasTags {
		if err := twin.ValidatePatch(u.tags); err != nil {
			return twinUpdate{}, invalid("tags: %v", err)
		}
	}
	if u.hasDesired {
		if err := twin.ValidatePatch(u.desired); err != nil {
			return twinUpdate{}, invalid("desired: %v", err)
		}
	}
	return u, nil
}

// stripReadOnly drops the read-only members ($metadata, $version) that a
// client may send back from a twin it read.
func stripReadOnly(m map[string]any) map[string]any {
	if m == nil {
		return nil
	}
	out := make(map[string]any, len(m))
	for k, v := range m {
		if k == "$metadata" || k == "$version" {
			continue
		}
		out[k] = v
	}
	return out
}

// desiredChange is what to tell the device after a service update.
type desiredChange struct {
	body    map[string]any // the notification body, with $version
	version int64
}

// applyServiceUpdate merges (replace=false) or replaces (replace=true) tags
// and desired properties, saves the record and returns the desired
// notification to send, if desired properties changed. The caller holds
// d.mu.
func (d *device) applyServiceUpdate(u twinUpdate, replace bool, now time.Time) (*desiredChange, error) {
	tags, desired, dmeta := d.rec.Tags, d.rec.Desired, d.rec.DesiredMeta
	var notify map[string]any
	ts := metaTime(now)
	if replace {
		// PUT replaces both sections; a missing section becomes empty.
		tags = twin.Merge(map[string]any{}, u.tags)
		newDesired := map[string]any{}
		if u.hasDesired {
			newDesired = twin.Merge(map[string]any{}, u.desired)
		}
		notify = deepCopy(newDesired)
		for k := range desired {
			if _, ok := newDesired[k]; !ok {
				notify[k] = nil
			}
		}
		desired = newDesired
		dmeta = map[string]any{}
		touchMeta(dmeta, desired, ts, d.rec.DesiredVersion+1)
	} else {
		if u.hasTags {
			tags = twin.Merge(deepCopy(tags), u.tags)
		}
		if u.hasDesired && len(u.desired) > 0 {
			desired = twin.Merge(deepCopy(desired), u.desired)
			dmeta = deepCopy(dmeta)
			touchMeta(dmeta, u.desired, ts, d.rec.DesiredVersion+1)
			notify = deepCopy(u.desired)
		}
	}
	if n := twin.Size(tags); n > twin.MaxTagsSize {
		return nil, invalid("tags would be %d bytes, over the limit of %d", n, twin.MaxTagsSize)
	}
	if n := twin.Size(desired); n > twin.MaxDesiredSize {
		return nil, invalid("desired properties would be %d bytes, over the limit of %d", n, twin.MaxDesiredSize)
	}
	if !replace && notify == nil && !(u.hasTags && len(u.tags) > 0) {
		return nil, nil // nothing to change
	}

	old := d.rec
	d.rec.Tags = tags
	d.rec.Version++
	var ch *desiredChange
	if notify != nil {
		d.rec.Desired, d.rec.DesiredMeta = desired, dmeta
		d.rec.DesiredVersion++
		notify["$version"] = d.rec.DesiredVersion
		ch = &desiredChange{body: notify, version: d.rec.DesiredVersion}
	}
	if err := d.save(); err != nil {
		d.rec = old
		return nil, err
	}
	return ch, nil
}

// marshalDoc encodes a document; documents hold only JSON values.
func marshalDoc(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		// Unreachable for decoded JSON; keep the device protocol valid.
		return []byte("{}")
	}
	return b
}
