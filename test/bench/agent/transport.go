package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/iothub/service"
)

// transportRun is one transport's agents in runTransports.
type transportRun struct {
	name  string
	flags func(h *hub.Hub) []string
	mem   []memSample
}

// runTransports measures the agent's idle memory over each transport:
// o.transportAgents agents over MQTT (the baseline) and as many over MQTT
// over WebSocket, all connected to one local hub at the same time, started
// alternately so that both see the same machine load. Each agent's VmRSS is
// read o.idle after the last one connected; the medians are printed, the
// WebSocket one as a ratio to the MQTT one.
func runTransports(ctx context.Context, o options) (err error) {
	tmp, err := os.MkdirTemp("", "gwagent-agentbench-transports.")
	if err != nil {
		return err
	}
	defer func() {
		if o.keep || err != nil {
			logf("kept %s", tmp)
			return
		}
		_ = os.RemoveAll(tmp)
	}()
	h, svc, err := startHub(ctx, tmp, true)
	if err != nil {
		return err
	}
	defer func() { _ = h.Close() }()

	runs := []*transportRun{
		{name: "mqtt", flags: func(h *hub.Hub) []string {
			return []string{"--hub-transport", "mqtt", "--hub-address", h.MQTTAddr()}
		}},
		{name: "websocket", flags: func(h *hub.Hub) []string {
			return []string{"--hub-transport", "websocket", "--hub-ws-address", h.HTTPSAddr()}
		}},
	}
	type started struct {
		id    string
		agent *proc
		run   *transportRun
	}
	var agents []started
	defer func() {
		for _, a := range agents {
			a.agent.stop()
		}
	}()
	for i := range o.transportAgents {
		for _, r := range runs {
			id := fmt.Sprintf("gw-bench-%s-%d", r.name, i)
			dev, err := svc.CreateDevice(ctx, id)
			if err != nil {
				return err
			}
			devCS, err := service.DeviceConnectionString(h.HostName(), dev)
			if err != nil {
				return err
			}
			a, err := startAgent(ctx, o, filepath.Join(tmp, id), devCS, h, r.flags(h)...)
			if err != nil {
				return err
			}
			agents = append(agents, started{id: id, agent: a, run: r})
		}
	}
	for _, a := range agents {
		if err := waitDeviceConnected(ctx, svc, a.id, a.agent); err != nil {
			return fmt.Errorf("%s (%s): %w", a.id, a.run.name, err)
		}
	}
	logf("%d agents connected (%d per transport); idling %s", len(agents), o.transportAgents, o.idle)
	if err := sleep(ctx, o.idle); err != nil {
		return err
	}
	for _, a := range agents {
		// Still connected over the transport it was given: an agent that
		// fell back or reconnected would not be measuring it.
		if err := a.agent.alive(); err != nil {
			return err
		}
		d, err := svc.GetDevice(ctx, a.id)
		if err != nil {
			return err
		}
		if d.ConnectionState != "Connected" {
			return fmt.Errorf("%s (%s) is %s after the idle time (log: %s)", a.id, a.run.name, d.ConnectionState, a.agent.logTail())
		}
		m, err := readMem(a.agent.pid())
		if err != nil {
			return err
		}
		a.run.mem = append(a.run.mem, m)
	}
	printTransports(os.Stdout, runs, o)
	return nil
}

// waitDeviceConnected polls the device's connection state through the
// service API.
func waitDeviceConnected(ctx context.Context, svc *service.Client, id string, agent *proc) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		if err := agent.alive(); err != nil {
			return err
		}
		d, err := svc.GetDevice(ctx, id)
		if err == nil && d.ConnectionState == "Connected" {
			return nil
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("did not connect: %w (log: %s)", err, agent.logTail())
		}
	}
}

// median of the field f of the samples, in KiB.
func medianKiB(ms []memSample, f func(memSample) int64) int64 {
	v := make([]int64, len(ms))
	for i, m := range ms {
		v[i] = f(m)
	}
	slices.Sort(v)
	return v[len(v)/2]
}

func printTransports(w io.Writer, runs []*transportRun, o options) {
	base := runs[0]
	baseRSS := medianKiB(base.mem, func(m memSample) int64 { return m.rss })
	baseAnon := medianKiB(base.mem, func(m memSample) int64 { return m.anon })
	fmt.Fprintf(w, "\n  6. idle memory per transport: %d agents each, all connected to one local hub at once,\n", o.transportAgents)
	fmt.Fprintf(w, "     VmRSS read %s after the last connected (median; the ratio is to %s in the same run)\n", o.idle, base.name)
	for _, r := range runs {
		rss := medianKiB(r.mem, func(m memSample) int64 { return m.rss })
		anon := medianKiB(r.mem, func(m memSample) int64 { return m.anon })
		all := make([]string, len(r.mem))
		for i, m := range r.mem {
			all[i] = fmt.Sprint(m.rss)
		}
		fmt.Fprintf(w, "     %-10s VmRSS %9s  x%.2f   RssAnon %9s  x%.2f   (all, KiB: %v)\n",
			r.name, mib(rss), float64(rss)/float64(baseRSS), mib(anon), float64(anon)/float64(baseAnon), all)
	}
}
