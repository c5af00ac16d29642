-- Argo CD health for incus.truenas.io/IncusInstanceSnapshot (truenas-incus-operator).
-- Degraded: phase Failed, for good: the policy refuses the snapshot, the instance is not found or
--           not this resource's, TrueNAS refused it, or the ZFS snapshot is Gone (destroyed by a
--           restore allowed to destroy newer snapshots, or by hand).
-- Progressing: no status yet, the operator has not acted on the latest generation, Pending
--              (waiting for the instance or the connection, or a failure it will retry), Creating,
--              Deleting, or being deleted.
-- Healthy: phase Ready and Ready=True.
-- Argo CD shows an object being deleted as Progressing "Pending deletion" without running this,
-- except an Argo CD hook (a PreSync snapshot) that still has the hook finalizer: the first branch
-- says the same for it. A condition message over 512 bytes is not relayed (argocd-cm scripts have
-- no string library to cut it): the reason then points at the Ready condition.
local hs = {status = "Progressing", message = "Waiting for the operator"}
local metadata = obj.metadata or {}
if metadata.deletionTimestamp ~= nil then
  hs.message = "Pending deletion"
  return hs
end
local status = obj.status
if status == nil then
  return hs
end
local ready
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then ready = condition end
  end
end
local generation = metadata.generation
local observed = status.observedGeneration
if ready ~= nil and ready.observedGeneration ~= nil and (observed == nil or ready.observedGeneration < observed) then
  observed = ready.observedGeneration
end
if generation ~= nil and observed ~= nil and observed < generation then
  hs.message = "Waiting for the operator to apply generation " .. generation
  return hs
end
local reason, detail = nil, ""
if ready ~= nil then
  reason = ready.reason
  if ready.message ~= nil and #ready.message > 512 then
    detail = " (see the Ready condition)"
  elseif ready.message ~= nil and ready.message ~= "" then
    detail = ": " .. ready.message
  end
end
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = (reason or "Failed") .. detail
  return hs
end
if status.phase == "Ready" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "snapshot taken"
  if status.snapshotName ~= nil then hs.message = "snapshot " .. status.snapshotName .. " taken" end
  return hs
end
local phase = status.phase or "Pending"
if reason ~= nil and reason ~= phase then
  phase = phase .. " (" .. reason .. ")"
end
hs.message = phase .. detail
return hs
