package hub

import (
	"context"
	"log/slog"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// newSlogLogger bridges the broker's slog logging into the hub's zap logger.
// The broker logs every refused client at Warn; those are normal for a hub
// that refuses bad devices on purpose, so its Warn becomes Debug and only
// its errors stay visible. Once off is set, records are dropped: the broker's
// event loop logs after Close returns, when the logger's owner (a test's
// zaptest logger, say) may be gone.
func newSlogLogger(log *zap.Logger, off *atomic.Bool) *slog.Logger {
	return slog.New(&zapHandler{log: log, off: off})
}

type zapHandler struct {
	log    *zap.Logger
	off    *atomic.Bool
	fields []zap.Field
	group  string
}

func (z *zapHandler) level(l slog.Level) zapcore.Level {
	if l >= slog.LevelError {
		return zapcore.ErrorLevel
	}
	return zapcore.DebugLevel
}

func (z *zapHandler) Enabled(_ context.Context, l slog.Level) bool {
	return !z.off.Load() && z.log.Core().Enabled(z.level(l))
}

func (z *zapHandler) Handle(_ context.Context, r slog.Record) error {
	if z.off.Load() {
		return nil
	}
	ce := z.log.Check(z.level(r.Level), r.Message)
	if ce == nil {
		return nil
	}
	fields := append([]zap.Field(nil), z.fields...)
	r.Attrs(func(a slog.Attr) bool {
		fields = append(fields, z.field(a))
		return true
	})
	ce.Write(fields...)
	return nil
}

func (z *zapHandler) field(a slog.Attr) zap.Field {
	key := a.Key
	if z.group != "" {
		key = z.group + "." + key
	}
	return zap.Any(key, a.Value.Resolve().Any())
}

func (z *zapHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	n := &zapHandler{log: z.log, off: z.off, group: z.group, fields: append([]zap.Field(nil), z.fields...)}
	for _, a := range attrs {
		n.fields = append(n.fields, z.field(a))
	}
	return n
}

func (z *zapHandler) WithGroup(name string) slog.Handler {
	g := name
	if z.group != "" {
		g = z.group + "." + name
	}
	return &zapHandler{log: z.log, off: z.off, group: g, fields: z.fields}
}
