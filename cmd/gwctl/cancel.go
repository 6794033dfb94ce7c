package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/gwagent/gwagent/iothub/service"
)

// cancelAnswer is gwagent's answer to cancelFirmwareUpdate (200 cancelled,
// 404 no such update, 409 ended or past the point of no return, 400 bad
// payload).
type cancelAnswer struct {
	UpdateID string `json:"updateId"`
	Status   string `json:"status"`
	Phase    string `json:"phase"`
	Error    string `json:"error"`
}

func (a *app) updateCancelCommand() *cobra.Command {
	var updateID string
	var times methodTimeouts
	cmd := &cobra.Command{
		Use:   "cancel ID [--update-id UPDATE]",
		Short: "Cancel a firmware update that has not been applied yet",
		Long: `Invoke the cancelFirmwareUpdate direct method: the device stops the update it
runs (or, with --update-id, that update only) if it is still waiting, downloading
or verifying. The download stops, the update ends failed with error code
"cancelled" and the device accepts the next update at once. Once the image is
being applied the device refuses (409) and names the phase.

Prints the id of the cancelled update. The device's 404 (no such update) and
409 (already ended, or past the point of no return) end with exit code 1.

` + exitCodesHelp,
		Args: exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withClient(func(c *service.Client) error {
				return a.cancelUpdate(cmd.Context(), c, args[0], updateID, &times)
			})
		},
	}
	cmd.Flags().StringVar(&updateID, "update-id", "", "cancel only this update (default: whichever runs)")
	times.register(cmd, "response-timeout")
	return cmd
}

func (a *app) cancelUpdate(ctx context.Context, c *service.Client, id, updateID string, t *methodTimeouts) error {
	payload := json.RawMessage(`{}`)
	if updateID != "" {
		b, err := json.Marshal(map[string]string{"updateId": updateID})
		if err != nil {
			return fmt.Errorf("encoding the request: %w", err)
		}
		payload = b
	}
	res, err := a.invoke(ctx, c, id, "cancelFirmwareUpdate", payload, t, "response-timeout")
	if err != nil {
		return err
	}
	var ans cancelAnswer
	_ = json.Unmarshal(res.Payload, &ans)
	reason := ans.Error
	if reason == "" {
		reason = string(res.Payload)
	}
	switch {
	case res.Status == 404 && strings.HasPrefix(ans.Error, "unknown method"):
		return &exitError{code: exitFailure, msg: fmt.Sprintf("device %s does not implement cancelFirmwareUpdate (404): %s", id, res.Payload)}
	case res.Status == 404:
		return &exitError{code: exitFailure, msg: fmt.Sprintf("device %s has no such update to cancel (404): %s", id, reason)}
	case res.Status == 409:
		return &exitError{code: exitFailure, msg: fmt.Sprintf("update %s on %s cannot be cancelled (409, phase %s): %s", ans.UpdateID, id, ans.Phase, reason)}
	case res.Status >= 400:
		return &exitError{code: exitFailure, msg: fmt.Sprintf("device %s refused the cancel (%d): %s", id, res.Status, reason)}
	}
	if a.output == "json" {
		return a.printJSON(map[string]any{"deviceId": id, "updateId": ans.UpdateID, "status": res.Status, "payload": res.Payload})
	}
	if ans.UpdateID == "" {
		_, err = fmt.Fprintf(a.stdout, "%s\n", res.Payload)
		return err
	}
	_, err = fmt.Fprintf(a.stdout, "update %s on %s cancelled\n", ans.UpdateID, id)
	return err
}
