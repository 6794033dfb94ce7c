package logging

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
	"go.uber.org/zap/zapcore"
)

// sendFunc delivers one entry to journald; journal.Send in production.
type sendFunc func(message string, priority journal.Priority, vars map[string]string) error

// Priority maps a zap level to a syslog priority as journald stores it.
// DPanic, Panic and Fatal are all "critical": the process is about to stop or
// has hit a bug, which is what an operator filtering with -p crit wants.
func Priority(l zapcore.Level) journal.Priority {
	switch {
	case l <= zapcore.DebugLevel:
		return journal.PriDebug
	case l == zapcore.InfoLevel:
		return journal.PriInfo
	case l == zapcore.WarnLevel:
		return journal.PriWarning
	case l == zapcore.ErrorLevel:
		return journal.PriErr
	default:
		return journal.PriCrit
	}
}

// reserved journal field names are set by this core or carry a meaning for
// journald; a zap field that maps onto one is renamed FIELD_<NAME> so that it
// cannot overwrite the entry's own.
var reserved = map[string]bool{
	"MESSAGE": true, "MESSAGE_ID": true, "PRIORITY": true, "ERRNO": true,
	"SYSLOG_IDENTIFIER": true, "SYSLOG_FACILITY": true, "SYSLOG_PID": true, "SYSLOG_TIMESTAMP": true,
	"CODE_FILE": true, "CODE_LINE": true, "CODE_FUNC": true, "LOGGER": true, "STACKTRACE": true,
	"TID": true, "DOCUMENTATION": true, "INVOCATION_ID": true, "USER_INVOCATION_ID": true,
	"UNIT": true, "USER_UNIT": true, "OBJECT_PID": true,
}

// maxFieldName is journald's limit; longer names are dropped by journald.
const maxFieldName = 64

// FieldName maps a zap field key to a journal field name: upper case letters,
// digits and underscores, words of camelCase split (updateId → UPDATE_ID,
// HTTPStatus → HTTP_STATUS), other characters turned into underscores, no
// leading underscore (journald keeps those for trusted fields) or digit, at
// most 64 characters.
func FieldName(key string) string {
	var b strings.Builder
	b.Grow(len(key) + 4)
	underscore := func() {
		if s := b.String(); s != "" && s[len(s)-1] != '_' {
			b.WriteByte('_')
		}
	}
	for i := 0; i < len(key); i++ {
		c := key[i]
		switch {
		case c >= 'a' && c <= 'z':
			b.WriteByte(c - 'a' + 'A')
		case c >= 'A' && c <= 'Z':
			if i > 0 {
				prev := key[i-1]
				prevLowerOrDigit := (prev >= 'a' && prev <= 'z') || (prev >= '0' && prev <= '9')
				// The last capital of an acronym starts the next word:
				// "HTTPStatus" splits before the "S".
				acronymEnd := prev >= 'A' && prev <= 'Z' && i+1 < len(key) && key[i+1] >= 'a' && key[i+1] <= 'z'
				if prevLowerOrDigit || acronymEnd {
					underscore()
				}
			}
			b.WriteByte(c)
		case c >= '0' && c <= '9':
			b.WriteByte(c)
		default:
			underscore()
		}
	}
	name := strings.Trim(b.String(), "_")
	switch {
	case name == "":
		name = "FIELD"
	case name[0] >= '0' && name[0] <= '9', reserved[name]:
		name = "FIELD_" + name
	}
	if len(name) > maxFieldName {
		name = strings.TrimRight(name[:maxFieldName], "_")
	}
	return name
}

// jfield is one encoded field: key is the zap key path (dotted through
// namespaces and objects) for the human-readable MESSAGE, name the journal
// field name.
type jfield struct {
	key, name, value string
}

// journalCore is a zapcore.Core that sends each entry to journald as one
// native-protocol datagram.
type journalCore struct {
	zapcore.LevelEnabler
	ident    string
	send     sendFunc
	fallback zapcore.Core // gets an entry journald did not take; carries the same context

	// Context added by With, and the namespace later fields are nested in.
	fields        []jfield
	nsKey, nsName string
}

// NewJournalCore returns a core that writes to the local journald with
// journal.Send. Entries journald refuses (socket gone, message too large for
// the fallback file) go to fallback instead, which may be nil.
func NewJournalCore(enab zapcore.LevelEnabler, identifier string, fallback zapcore.Core) zapcore.Core {
	return newJournalCore(enab, identifier, journal.Send, fallback)
}

func newJournalCore(enab zapcore.LevelEnabler, identifier string, send sendFunc, fallback zapcore.Core) *journalCore {
	if fallback == nil {
		fallback = zapcore.NewNopCore()
	}
	return &journalCore{LevelEnabler: enab, ident: identifier, send: send, fallback: fallback}
}

func (c *journalCore) With(fields []zapcore.Field) zapcore.Core {
	clone := *c
	clone.fields = slices.Clip(c.fields)
	clone.fields, clone.nsKey, clone.nsName = appendFields(clone.fields, c.nsKey, c.nsName, fields)
	clone.fallback = c.fallback.With(fields)
	return &clone
}

func (c *journalCore) Check(ent zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(ent.Level) {
		return ce.AddCore(ent, c)
	}
	return ce
}

func (c *journalCore) Write(ent zapcore.Entry, fields []zapcore.Field) error {
	all, _, _ := appendFields(slices.Clip(c.fields), c.nsKey, c.nsName, fields)
	vars := make(map[string]string, len(all)+6)
	for _, f := range all {
		vars[f.name] = f.value // a later field with the same name wins, as in a JSON reader
	}
	if c.ident != "" {
		vars["SYSLOG_IDENTIFIER"] = c.ident
	}
	if ent.LoggerName != "" {
		vars["LOGGER"] = ent.LoggerName
	}
	if ent.Caller.Defined {
		vars["CODE_FILE"] = ent.Caller.File
		vars["CODE_LINE"] = strconv.Itoa(ent.Caller.Line)
		if ent.Caller.Function != "" {
			vars["CODE_FUNC"] = ent.Caller.Function
		}
	}
	if ent.Stack != "" {
		vars["STACKTRACE"] = ent.Stack
	}
	if err := c.send(message(ent, all), Priority(ent.Level), vars); err != nil {
		// Losing the entry is worse than writing it unstructured: stderr is
		// the journal's stream, or at least somewhere a person looks.
		if ferr := c.fallback.Write(ent, fields); ferr != nil {
			return fmt.Errorf("logging: journal: %w (fallback: %v)", err, ferr)
		}
	}
	return nil
}

func (c *journalCore) Sync() error { return c.fallback.Sync() }

// message is the MESSAGE of an entry: what `journalctl` and `systemctl status`
// show. The fields are repeated there as key=value because a person reading
// the log needs them as much as a query does.
func message(ent zapcore.Entry, fields []jfield) string {
	var b strings.Builder
	if ent.LoggerName != "" {
		b.WriteString(ent.LoggerName)
		b.WriteString(": ")
	}
	b.WriteString(ent.Message)
	for _, f := range fields {
		b.WriteByte(' ')
		b.WriteString(f.key)
		b.WriteByte('=')
		b.WriteString(quoteIfNeeded(f.value))
	}
	return b.String()
}

func quoteIfNeeded(s string) string {
	if s == "" || strings.ContainsFunc(s, func(r rune) bool {
		return r <= ' ' || r == '"' || r == '=' || r == '\\' || r == 0x7f || !strconv.IsPrint(r)
	}) {
		return strconv.Quote(s)
	}
	return s
}

// appendFields encodes fields in order, following zap.Namespace: fields after
// a namespace are nested in it (NS_KEY in the journal, ns.key in MESSAGE).
func appendFields(dst []jfield, nsKey, nsName string, fields []zapcore.Field) ([]jfield, string, string) {
	for _, f := range fields {
		if f.Type == zapcore.NamespaceType {
			nsKey += f.Key + "."
			nsName += FieldName(f.Key) + "_"
			continue
		}
		enc := zapcore.NewMapObjectEncoder()
		f.AddTo(enc)
		dst = flatten(dst, nsKey, nsName, enc.Fields)
	}
	return dst, nsKey, nsName
}

// flatten appends the values of m (sorted by key for a stable MESSAGE) with
// nested objects spread into PARENT_CHILD fields.
func flatten(dst []jfield, keyPrefix, namePrefix string, m map[string]any) []jfield {
	for _, k := range slices.Sorted(maps.Keys(m)) {
		// The whole path is mapped at once so that renaming and the length
		// limit apply to the name journald will see.
		key, name := keyPrefix+k, FieldName(namePrefix+k)
		if sub, ok := m[k].(map[string]any); ok {
			dst = flatten(dst, key+".", name+"_", sub)
			continue
		}
		dst = append(dst, jfield{key: key, name: name, value: valueString(m[k])})
	}
	return dst
}

// valueString renders a value as a MapObjectEncoder stores it.
func valueString(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case []byte: // zap.Binary
		return base64.StdEncoding.EncodeToString(v)
	case bool:
		return strconv.FormatBool(v)
	case time.Time:
		return v.Format(time.RFC3339Nano)
	case time.Duration:
		return v.String()
	case float64:
		return strconv.FormatFloat(v, 'g', -1, 64)
	case float32:
		return strconv.FormatFloat(float64(v), 'g', -1, 32)
	case int, int64, int32, int16, int8, uint, uint64, uint32, uint16, uint8, uintptr, complex64, complex128:
		return fmt.Sprint(v)
	case fmt.Stringer:
		return v.String()
	case error:
		return v.Error()
	}
	if b, err := json.Marshal(v); err == nil {
		return string(b)
	}
	return fmt.Sprint(v)
}
