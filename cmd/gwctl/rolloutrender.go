package main

import (
	"fmt"
	"text/tabwriter"
)

// renderRollout prints a rollout's status: a table (one line per wave, a
// total, the failed devices) or, with -o json, the status document.
func (a *app) renderRollout(st rolloutStatus) error {
	if a.output == "json" {
		return a.printJSON(st)
	}
	fmt.Fprintf(a.stdout, "rollout %s: %s, wave %d of %d, version %s, %d devices\n", st.Name, st.State, st.Wave, len(st.Waves), st.Version, st.Devices)
	if st.Reason != "" {
		fmt.Fprintf(a.stdout, "reason: %s\n", st.Reason)
	}
	w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "WAVE\tSIZE\tASSIGNED\tPENDING\tRUNNING\tWAITING\tCOMPLETED\tFAILED\tOFFLINE")
	row := func(label string, size, assigned int, c counts) {
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n", label, size, assigned, c.Pending, c.Running, c.Waiting, c.Completed, c.Failed, c.Offline)
	}
	size, assigned := 0, 0
	for _, wv := range st.Waves {
		row(fmt.Sprint(wv.Index), wv.Size, wv.Assigned, wv.Counts)
		size += wv.Size
		assigned += wv.Assigned
	}
	row("total", size, assigned, st.Counts)
	if err := w.Flush(); err != nil {
		return err
	}
	if len(st.Failed) == 0 {
		return nil
	}
	fmt.Fprintln(a.stdout, "failed devices:")
	w = tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "  DEVICE\tWAVE\tCODE\tMESSAGE")
	for _, f := range st.Failed {
		fmt.Fprintf(w, "  %s\t%d\t%s\t%s\n", f.DeviceID, f.Wave, f.Code, f.Message)
	}
	return w.Flush()
}

// renderRolloutList prints the rollouts recorded on the hub.
func (a *app) renderRolloutList(rs []*record) error {
	if a.output == "json" {
		out := make([]map[string]any, 0, len(rs))
		for _, r := range rs {
			out = append(out, map[string]any{"name": r.Name, "state": r.State.State, "wave": r.State.Wave, "waves": len(r.sizes),
				"devices": r.Plan.Devices, "version": r.Plan.Firmware.Version, "createdAt": r.Plan.CreatedAt, "createdBy": r.Plan.CreatedBy})
		}
		return a.printJSON(out)
	}
	w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tSTATE\tWAVE\tDEVICES\tVERSION\tCREATED\tBY")
	for _, r := range rs {
		fmt.Fprintf(w, "%s\t%s\t%d/%d\t%d\t%s\t%s\t%s\n", r.Name, r.State.State, r.State.Wave, len(r.sizes), r.Plan.Devices,
			r.Plan.Firmware.Version, r.Plan.CreatedAt, r.Plan.CreatedBy)
	}
	return w.Flush()
}
