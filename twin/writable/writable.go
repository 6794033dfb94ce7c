package writable

import (
	"context"
	"fmt"
	"maps"
	"slices"
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

// UnknownKey is the reported property that acknowledges, in one object,
// every desired property the agent does not know:
// {"ac": 400, "av": <desired $version>, "ad": <why>, "count": <how many>,
// "keys": [<the first of them, sorted>]}. One bounded object, not one per
// key: desired keys are the service's to add, and one acknowledgement each
// once filled the reported properties to IoT Hub's limit, after which the
// hub refused the agent's next state change.
const UnknownKey = "unknownDesired"

// Bounds of the UnknownKey acknowledgement: it lists at most MaxListed
// keys and at most MaxListedBytes bytes of key names (a key may have 1 KB),
// so it stays under 1.3 KB however many keys are unknown.
const (
	MaxListed      = 20
	MaxListedBytes = 1024
)

// chunkSize bounds one reported patch of acknowledgements (as twin.Size
// counts): a full document can withdraw hundreds of acknowledgements left
// by an older version, more than one patch may hold.
const chunkSize = 8 * 1024

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

	synced     chan struct{} // closed by the first full document
	syncedOnce sync.Once

	mu         sync.Mutex // guards everything below
	props      map[string]Property
	overridden map[string]bool // set from desired (not the configured value)
	unknown    map[string]bool // desired keys that are not properties
	// unknownAcked is set while the UnknownKey acknowledgement is on the
	// twin (or queued for it) and unknownAck is what it says.
	unknownAcked bool
	unknownAck   map[string]any
	// stale are the acknowledgements of unregistered keys the twin showed
	// at the last full document (an older version acknowledged each unknown
	// key): withdrawn then, and again by Withdrawal.
	stale map[string]bool
}

// New returns an Acker reporting to sink. reserved are reported properties
// the agent writes itself; desired keys with those names are ignored
// (UnknownKey is always reserved).
func New(sink Sink, reserved []string, log *zap.Logger) *Acker {
	if log == nil {
		log = zap.NewNop()
	}
	a := &Acker{sink: sink, log: log, reserved: map[string]bool{UnknownKey: true}, synced: make(chan struct{}),
		props: map[string]Property{}, overridden: map[string]bool{}, unknown: map[string]bool{}, stale: map[string]bool{}}
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

// Names lists the registered writable properties, sorted.
func (a *Acker) Names() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	names := make([]string, 0, len(a.props))
	for n := range a.props {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
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

// UnknownAck is the UnknownKey acknowledgement of the unknown desired keys
// (nil for none), listing them within MaxListed and MaxListedBytes.
func UnknownAck(keys []string, av int64) map[string]any {
	if len(keys) == 0 {
		return nil
	}
	keys = slices.Sorted(slices.Values(keys))
	listed, bytes := []any{}, 0
	for _, k := range keys {
		if len(listed) == MaxListed || bytes+len(k) > MaxListedBytes {
			break
		}
		listed = append(listed, k)
		bytes += len(k)
	}
	ad := "unknown desired property, ignored"
	if len(keys) > 1 {
		ad = fmt.Sprintf("%d unknown desired properties, ignored", len(keys))
	}
	if len(listed) < len(keys) {
		ad += fmt.Sprintf("; the first %d are listed", len(listed))
	}
	m := Ack(nil, ACRejected, av, ad)
	m["count"] = len(keys)
	m["keys"] = listed
	return m
}

// OnDesired applies a desired document (full: the whole desired section,
// keys absent from it are not desired) or patch (null: no longer desired)
// of the given $version, and reports the acknowledgements. reported, when
// known (with a full document), is the reported section: an
// acknowledgement in it for a key that is not a registered property is
// withdrawn (an older version acknowledged every unknown key on its own),
// and the UnknownKey acknowledgement is written only if it says something
// else.
func (a *Acker) OnDesired(doc map[string]any, version int64, full bool, reported map[string]any) {
	a.mu.Lock()
	defer a.mu.Unlock()
	patch := map[string]any{}
	unknownChanged := false
	var added []string
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
				unknownChanged = true
			}
		default:
			if !a.unknown[k] {
				a.unknown[k] = true
				unknownChanged = true
				added = append(added, k)
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
				unknownChanged = true
			}
		}
		clear(a.stale)
		for k, v := range reported {
			if _, registered := a.props[k]; !registered && !a.reserved[k] && isAck(v) {
				patch[k] = nil
				a.stale[k] = true
			}
		}
		// The twin says what is acknowledged: write the UnknownKey
		// acknowledgement only where it differs.
		if reported != nil {
			onTwin, _ := reported[UnknownKey].(map[string]any)
			a.unknownAcked, a.unknownAck = onTwin != nil, onTwin
		}
		if want := UnknownAck(slices.Collect(maps.Keys(a.unknown)), version); !sameListing(a.unknownAck, want) {
			unknownChanged = true
		}
	}
	if len(added) > 0 {
		slices.Sort(added)
		a.log.Warn("unknown desired properties, ignored (acknowledged with 400 in "+UnknownKey+")",
			zap.Int64("version", version), zap.Int("new", len(added)), zap.Int("unknown", len(a.unknown)),
			zap.Strings("keys", added[:min(len(added), MaxListed)]))
	}
	if unknownChanged {
		if ack := UnknownAck(slices.Collect(maps.Keys(a.unknown)), version); ack != nil {
			patch[UnknownKey] = ack
			a.unknownAcked, a.unknownAck = true, ack
		} else if a.unknownAcked {
			patch[UnknownKey] = nil
			a.unknownAcked, a.unknownAck = false, nil
		}
	}
	if full {
		a.syncedOnce.Do(func() { close(a.synced) })
	}
	a.reportLocked(patch)
}

// reportLocked queues the acknowledgements, in patches of at most
// chunkSize. They are milestones: the queue keeps them on disk until the
// hub has them (it keeps progress in memory only), and never merges them
// away.
func (a *Acker) reportLocked(patch map[string]any) {
	for _, p := range twin.SplitPatch(patch, chunkSize) {
		if err := a.sink.Report(p, true); err != nil {
			a.log.Error("cannot queue desired-property acknowledgements", zap.Error(err))
		}
	}
}

// Withdrawal returns a patch that takes the acknowledgements the agent can
// do without off the twin, to make room when the hub refuses a state change
// because the reported properties are full (twin.QueueOptions.MakeRoom):
// the UnknownKey acknowledgement and the acknowledgements an older version
// left for unregistered keys. Those of registered properties stay. It
// waits, within ctx, for the first full desired document (which shows what
// the twin holds); nil when there is nothing to withdraw. The UnknownKey
// acknowledgement is written again with the next desired change or
// connection.
func (a *Acker) Withdrawal(ctx context.Context) map[string]any {
	select {
	case <-a.synced:
	case <-ctx.Done():
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	patch := map[string]any{}
	for k := range a.stale {
		patch[k] = nil
	}
	withdrawn := a.unknownAcked
	if withdrawn {
		patch[UnknownKey] = nil
		a.unknownAcked, a.unknownAck = false, nil
	}
	if len(patch) == 0 {
		return nil
	}
	a.log.Warn("withdrawing acknowledgements to make room in the reported properties",
		zap.Int("stale", len(a.stale)), zap.Bool("unknown_ack", withdrawn))
	return patch
}

// sameListing reports whether two UnknownKey acknowledgements list the
// same keys and count (the version alone does not call for a new one).
func sameListing(a, b map[string]any) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return fmt.Sprint(a["count"]) == fmt.Sprint(b["count"]) && fmt.Sprint(a["keys"]) == fmt.Sprint(b["keys"])
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
