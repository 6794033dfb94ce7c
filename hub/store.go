package hub

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
)

// recordFormat is the version of the on-disk device record. A record with a
// newer format is refused rather than misread.
const recordFormat = 1

const devicesDir = "devices"

// record is one device identity and its twin, as stored in
// DIR/devices/<escaped id>.json. Connection state is not stored: a hub that
// starts has no device connected.
type record struct {
	Format            int       `json:"format"`
	DeviceID          string    `json:"deviceId"`
	GenerationID      string    `json:"generationId"`
	DeviceETag        int64     `json:"deviceEtag"` // counter; the etag string is derived from it
	Status            string    `json:"status"`     // enabled | disabled
	StatusReason      string    `json:"statusReason,omitempty"`
	StatusUpdatedTime time.Time `json:"statusUpdatedTime"`
	Auth              authData  `json:"auth"`
	LastActivityTime  time.Time `json:"lastActivityTime"`
	// ModelID is the IoT Plug and Play model the device named at its last
	// connect that named one (model-id in the MQTT username).
	ModelID string `json:"modelId,omitempty"`

	// Twin. Version counts every twin change; the section versions count
	// changes of their own section only, as IoT Hub's $version does.
	Version         int64          `json:"version"`
	Tags            map[string]any `json:"tags"`
	Desired         map[string]any `json:"desired"`
	DesiredVersion  int64          `json:"desiredVersion"`
	DesiredMeta     map[string]any `json:"desiredMeta"`
	Reported        map[string]any `json:"reported"`
	ReportedVersion int64          `json:"reportedVersion"`
	ReportedMeta    map[string]any `json:"reportedMeta"`
}

type authData struct {
	Type                string `json:"type"` // sas | selfSigned
	PrimaryKey          string `json:"primaryKey,omitempty"`
	SecondaryKey        string `json:"secondaryKey,omitempty"`
	PrimaryThumbprint   string `json:"primaryThumbprint,omitempty"`
	SecondaryThumbprint string `json:"secondaryThumbprint,omitempty"`
}

// device is a record in memory with its lock. Every field of rec, and the
// record file, is guarded by mu; the lock is held across the file write so
// that the file always holds the newest state.
type device struct {
	id string // the device id; never changes, read without mu

	mu      sync.Mutex
	rec     record
	path    string
	deleted bool // removed from the registry; guarded by mu
	// lastActivity is updated on every packet without rewriting the file;
	// it is saved with the next write. Guarded by mu.
	lastActivity time.Time
}

// store is the registry: every device record, loaded at start and written
// through on each change.
type store struct {
	dir string

	mu   sync.RWMutex // guards devs
	devs map[string]*device
}

func openStore(stateDir string) (*store, error) {
	dir := filepath.Join(stateDir, devicesDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("hub: create %s: %w", dir, err)
	}
	s := &store{dir: dir, devs: map[string]*device{}}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("hub: read %s: %w", dir, err)
	}
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
			continue // renameio temp files start with '.'
		}
		path := filepath.Join(dir, name)
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("hub: read %s: %w", path, err)
		}
		if len(bytes.TrimSpace(b)) == 0 {
			continue // an empty file is a write that never completed
		}
		var rec record
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.UseNumber()
		if err := dec.Decode(&rec); err != nil {
			return nil, fmt.Errorf("hub: decode %s: %w", path, err)
		}
		if rec.Format != recordFormat {
			return nil, fmt.Errorf("hub: %s has format %d, this hub reads %d", path, rec.Format, recordFormat)
		}
		if rec.DeviceID == "" || s.fileName(rec.DeviceID) != path {
			return nil, fmt.Errorf("hub: %s does not hold the device its name says", path)
		}
		rec.ensureMaps()
		s.devs[rec.DeviceID] = &device{id: rec.DeviceID, rec: rec, path: path, lastActivity: rec.LastActivityTime}
	}
	return s, nil
}

// fileName maps a device id to its record file. Device ids may hold
// characters such as '#', '?', '*' and '%'; query escaping leaves a name that
// is safe on any file system and still readable for plain ids.
func (s *store) fileName(id string) string {
	return filepath.Join(s.dir, "d-"+url.QueryEscape(id)+".json")
}

func (r *record) ensureMaps() {
	for _, m := range []*map[string]any{&r.Tags, &r.Desired, &r.DesiredMeta, &r.Reported, &r.ReportedMeta} {
		if *m == nil {
			*m = map[string]any{}
		}
	}
}

func (s *store) get(id string) *device {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.devs[id]
}

// errExists is returned by add when the id is taken.
var errExists = errors.New("hub: device already exists")

// add stores a new device record and returns it.
func (s *store) add(rec record) (*device, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.devs[rec.DeviceID]; ok {
		return nil, errExists
	}
	rec.Format = recordFormat
	rec.ensureMaps()
	d := &device{id: rec.DeviceID, rec: rec, path: s.fileName(rec.DeviceID), lastActivity: rec.LastActivityTime}
	if err := d.save(); err != nil {
		return nil, err
	}
	s.devs[rec.DeviceID] = d
	return d, nil
}

// remove deletes d from the registry and its file. The caller holds d.mu.
func (s *store) remove(d *device) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.devs[d.id] == d {
		delete(s.devs, d.id)
	}
	d.deleted = true
	if err := os.Remove(d.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("hub: remove %s: %w", d.path, err)
	}
	return nil
}

// list returns all devices ordered by id.
func (s *store) list() []*device {
	s.mu.RLock()
	out := make([]*device, 0, len(s.devs))
	for _, d := range s.devs {
		out = append(out, d)
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b *device) int { return strings.Compare(a.id, b.id) })
	return out
}

func (s *store) len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.devs)
}

// save writes the record atomically (temp file, fsync, rename). The caller
// holds d.mu.
func (d *device) save() error {
	d.rec.LastActivityTime = d.lastActivity
	b, err := json.Marshal(&d.rec)
	if err != nil {
		return fmt.Errorf("hub: encode device %s: %w", d.rec.DeviceID, err)
	}
	if err := atomicfile.WriteFile(d.path, b, 0o600); err != nil {
		return fmt.Errorf("hub: save device %s: %w", d.rec.DeviceID, err)
	}
	return nil
}
