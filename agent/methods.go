package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/gwagent/gwagent/agent/router"
	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/twin/report"
	"github.com/gwagent/gwagent/twin/writable"
)

// rebootTimeout bounds the Rebooter call (systemctl reboot returns at once;
// the stop that follows is the service manager's).
const rebootTimeout = 30 * time.Second

// handleFirmwareUpdate accepts an update and answers at once; the state
// machine does the work and the twin shows its progress.
func (a *Agent) handleFirmwareUpdate(_ context.Context, payload []byte) router.Response {
	req, err := firmware.ParseRequest(payload)
	if err != nil {
		return router.JSON(400, map[string]string{"error": reason(err)})
	}
	id, err := a.manager.Start(req)
	var busy *firmware.BusyError
	switch {
	case errors.As(err, &busy):
		return router.JSON(409, map[string]string{"error": "busy", "updateId": busy.UpdateID})
	case errors.Is(err, firmware.ErrInvalidRequest):
		return router.JSON(400, map[string]string{"error": reason(err)})
	case err != nil:
		a.log.Error("cannot accept the update", zap.Error(err))
		return router.Error(500, "cannot accept the update: %v", err)
	}
	a.kickStatus()
	return router.JSON(200, map[string]string{"updateId": id, "status": "accepted"})
}

// handleCancelFirmwareUpdate stops the running update (or the one the
// payload names) if it has not been applied yet. It answers once the
// record says cancelled and the download has stopped, so a restart right
// after the answer does not resume it: 200 {"updateId", "status":
// "cancelled"}; 404 for an update that is not the current one (or none);
// 409 with the phase for one that has ended or is past the point of no
// return; 400 for a payload that is not {} / null / {"updateId": "…"}.
func (a *Agent) handleCancelFirmwareUpdate(ctx context.Context, payload []byte) router.Response {
	id, err := firmware.ParseCancel(payload)
	if err != nil {
		return router.JSON(400, map[string]string{"error": reason(err)})
	}
	id, err = a.manager.Cancel(ctx, id)
	var nc *firmware.NotCancellableError
	switch {
	case errors.As(err, &nc):
		msg := "the update is past the point of no return"
		if nc.Phase.Terminal() {
			msg = "the update has already ended"
		}
		return router.JSON(409, map[string]string{"error": msg, "updateId": nc.UpdateID, "phase": string(nc.Phase)})
	case errors.Is(err, firmware.ErrNoUpdate):
		return router.JSON(404, map[string]string{"error": strings.TrimPrefix(err.Error(), firmware.ErrNoUpdate.Error()+": ")})
	case err != nil:
		a.log.Error("cannot cancel the update", zap.Error(err))
		return router.Error(500, "cannot cancel the update: %v", err)
	}
	a.kickStatus()
	return router.JSON(200, map[string]string{"updateId": id, "status": "cancelled"})
}

// reason is an error without the package prefix, for the caller.
func reason(err error) string {
	return strings.TrimPrefix(err.Error(), firmware.ErrInvalidRequest.Error()+": ")
}

// handleReboot answers, then (after the answer is sent) reports lastReboot,
// flushes the queue and reboots through the installer's seam.
func (a *Agent) handleReboot(_ context.Context, _ []byte) router.Response {
	if a.rebooter == nil {
		return router.Error(501, "this installer cannot reboot the device")
	}
	if st := a.manager.Status(); st.Busy {
		return router.JSON(409, map[string]string{"error": "busy", "updateId": st.UpdateID})
	}
	if !a.rebootPending.CompareAndSwap(false, true) {
		return router.Error(409, "a reboot is already in progress")
	}
	return router.Response{Status: 200, Body: map[string]string{"status": "rebooting"}, After: func() {
		select {
		case a.rebootCh <- struct{}{}:
		default:
		}
	}}
}

func (a *Agent) rebootWorker(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case p := <-a.probeReboot:
			close(p)
		case <-a.rebootCh:
			a.reboot(ctx)
			a.rebootPending.Store(false)
		}
	}
}

func (a *Agent) reboot(ctx context.Context) {
	now := time.Now().UTC().Format(report.TimeFormat)
	a.log.Info("rebooting on request", zap.String("last_reboot", now))
	patch := map[string]any{"iothubDM": map[string]any{"reboot": map[string]any{"lastReboot": now}}}
	if err := a.queue.Report(patch, true); err != nil {
		a.log.Error("cannot queue lastReboot", zap.Error(err))
	}
	// Give the report a chance to reach the hub before the network goes.
	fctx, cancel := context.WithTimeout(ctx, a.config().ShutdownTimeout)
	if err := a.queue.Flush(fctx); err != nil {
		a.log.Warn("rebooting with reported patches pending; they are kept for the next start", zap.Error(err))
	}
	cancel()
	rctx, cancel := context.WithTimeout(ctx, rebootTimeout)
	defer cancel()
	if err := a.rebooter.Reboot(rctx); err != nil {
		a.log.Error("reboot failed", zap.Error(err))
	}
}

// logLevelProperty is the writable logLevel: it changes the level of the
// running logger; withdrawn, it returns to log.level.
func (a *Agent) logLevelProperty() writable.Property {
	return writable.Property{
		Apply: func(v any) (any, error) {
			s, ok := v.(string)
			if !ok {
				return a.level.Level().String(), fmt.Errorf("logLevel must be a string: debug, info, warn or error")
			}
			l, err := parseLevel(s)
			if err != nil {
				return a.level.Level().String(), err
			}
			a.level.SetLevel(l)
			return l.String(), nil
		},
		Reset: func() any {
			if l, err := parseLevel(a.config().Log.Level); err == nil {
				a.level.SetLevel(l)
			}
			return a.level.Level().String()
		},
	}
}

func parseLevel(s string) (zapcore.Level, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "debug":
		return zapcore.DebugLevel, nil
	case "info":
		return zapcore.InfoLevel, nil
	case "warn", "warning":
		return zapcore.WarnLevel, nil
	case "error":
		return zapcore.ErrorLevel, nil
	}
	return zapcore.InfoLevel, fmt.Errorf("logLevel %q: must be debug, info, warn or error", s)
}
