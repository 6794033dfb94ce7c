package writable

import (
	"strings"
	"sync"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/twin"
)

// Sink takes reported-property patches; *twin.Queue is one.
type Sink interface {
	Report(patch map[string]any, milestone bool) error
}

// Ack codes (IoT Plug and Play writable-property convention).
const (
	ACAccepted = 200
	ACRejected = 400
)

// Property is one writable property.
type Property struct {
	// Apply puts a desired value into effect. It returns the value in effect
	// afterwards and, when it refuses v, an error saying why (the old value
	// stays in effect).
	Apply func(v any) (actual any, err error)
	// Reset returns to the configured value when the property is no longer
	// desired, and returns it.
	Reset func() any
}

// Acker applies desired properties and reports their acknowledgements.
// OnDesired is meant to be the session's DesiredFunc.
type Acker struct {
	sink     Sink
	log      *zap.Logger
	reserved map[string]bool

	mu         sync.Mutex // guards everything below
	props      map[string]Property
	overridden map[string]bool // set from desired (not the configured value)
	unknown    map[string]bool // acknowledged with 400 as unknown
}

// New returns an Acker reporting to sink. reserved are reported properties
// the agent writes itself; desired keys with those names are ignored.
func New(sink Sink, reserved []string, log *zap.Logger) *Acker {
	if log == nil {
		log = zap.NewNop()
	}
	a := &Acker{sink: sink, log: log, reserved: map[string]bool{}, props: map[string]Property{},
		overridden: map[string]bool{}, unknown: map[string]bool{}}
	for _, r := range reserved {
		a.reserved[r] = true
	}
	return a
}

// Register adds a writable property.
func (a *Acker) Register(name string, p Property) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.props[name] = p
}

// Overridden reports whether a property currently holds a desired value
// rather than its configured one.
func (a *Acker) Overridden(name string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.overridden[name]
}

// Ack is the acknowledgement object of one property.
func Ack(value any, ac int, av int64, ad string) map[string]any {
	m := map[string]any{"ac": ac, "av": av}
	if value != nil {
		m["value"] = value
	}
	if ad != "" {
		m["ad"] = ad
	}
	return m
}

// OnDesired applies a desired document (full: the whole desired section,
// keys absent from it are not desired) or patch (null: no longer desired)
// of the given $version, and reports the acknowledgements in one patch.
// reported, when known (with a full document), is the reported section: an
// acknowledgement in it for a key that is no longer desired is withdrawn,
// even one written before a restart.
func (a *Acker) OnDesired(doc map[string]any, version int64, full bool, reported map[string]any) {
	a.mu.Lock()
	defer a.mu.Unlock()
	patch := map[string]any{}
	for k, v := range doc {
		if strings.HasPrefix(k, "$") {
			continue
		}
		prop, known := a.props[k]
		switch {
		case known && v == nil:
			a.resetLocked(patch, k, prop, version)
		case known:
			actual, err := prop.Apply(v)
			if err != nil {
				a.log.Warn("desired property refused", zap.String("property", k), zap.Int64("version", version), zap.Error(err))
				a.put(patch, k, Ack(actual, ACRejected, version, err.Error()))
				continue
			}
			a.log.Info("desired property applied", zap.String("property", k), zap.Any("value", actual), zap.Int64("version", version))
			a.overridden[k] = true
			a.put(patch, k, Ack(actual, ACAccepted, version, ""))
		case a.reserved[k]:
			a.log.Warn("desired property has the name of a reported property the agent owns; ignored", zap.String("property", k))
		case v == nil:
			if a.unknown[k] {
				delete(a.unknown, k)
				patch[k] = nil // withdraw the 400
			}
		default:
			a.log.Warn("unknown desired property", zap.String("property", k), zap.Int64("version", version))
			if a.put(patch, k, Ack(nil, ACRejected, version, "unknown property")) {
				a.unknown[k] = true
			}
		}
	}
	if full {
		for k, prop := range a.props {
			if _, ok := doc[k]; !ok && a.overridden[k] {
				a.resetLocked(patch, k, prop, version)
			}
		}
		for k := range a.unknown {
			if _, ok := doc[k]; !ok {
				delete(a.unknown, k)
				patch[k] = nil
			}
		}
		for k, v := range reported {
			_, desired := doc[k]
			_, registered := a.props[k]
			if !desired && !registered && !a.reserved[k] && isAck(v) {
				patch[k] = nil
			}
		}
	}
	if len(patch) == 0 {
		return
	}
	// A milestone: the queue keeps it on disk until the hub has it (it
	// keeps progress in memory only), and never merges it away.
	if err := a.sink.Report(patch, true); err != nil {
		a.log.Error("cannot queue desired-property acknowledgements", zap.Error(err))
	}
}

// isAck tells an acknowledgement object ({"ac":…,"av":…}) from other
// reported values.
func isAck(v any) bool {
	m, ok := v.(map[string]any)
	if !ok {
		return false
	}
	_, ac := m["ac"]
	_, av := m["av"]
	return ac && av
}

func (a *Acker) resetLocked(patch map[string]any, k string, prop Property, version int64) {
	actual := prop.Reset()
	delete(a.overridden, k)
	a.log.Info("desired property withdrawn; configured value restored", zap.String("property", k), zap.Any("value", actual))
	a.put(patch, k, Ack(actual, ACAccepted, version, "not desired; configured value"))
}

// put adds an acknowledgement if it is a valid reported property (a desired
// key the hub accepted is, but this does not rely on it).
func (a *Acker) put(patch map[string]any, k string, ack map[string]any) bool {
	if err := twin.ValidatePatch(map[string]any{k: ack}); err != nil {
		a.log.Warn("cannot acknowledge desired property", zap.String("property", k), zap.Error(err))
		return false
	}
	patch[k] = ack
	return true
}
