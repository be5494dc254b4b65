package dev.vlmpruner.edge.demo

import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.rememberLauncherForActivityResult
import androidx.activity.compose.setContent
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.activity.viewModels
import androidx.compose.foundation.Image
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Box
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.height
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.safeDrawingPadding
import androidx.compose.foundation.layout.width
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.text.selection.SelectionContainer
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.Button
import androidx.compose.material3.Card
import androidx.compose.material3.CardDefaults
import androidx.compose.material3.DropdownMenu
import androidx.compose.material3.DropdownMenuItem
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Slider
import androidx.compose.material3.Surface
import androidx.compose.material3.Switch
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.runtime.Composable
import androidx.compose.runtime.collectAsState
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.graphics.asImageBitmap
import androidx.compose.ui.layout.ContentScale
import androidx.compose.ui.platform.LocalClipboardManager
import androidx.compose.ui.text.AnnotatedString
import androidx.compose.ui.text.font.FontFamily
import androidx.compose.ui.text.font.FontWeight
import androidx.compose.ui.unit.dp

class MainActivity : ComponentActivity() {
    private val viewModel: MainViewModel by viewModels()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent {
            MaterialTheme {
                Surface(modifier = Modifier.fillMaxSize()) { DemoScreen(viewModel) }
            }
        }
    }
}

@Composable
fun DemoScreen(viewModel: MainViewModel) {
    val state by viewModel.state.collectAsState()
    val pickImage = rememberLauncherForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri ->
        if (uri != null) viewModel.setImage(uri)
    }
    val takePicture = rememberLauncherForActivityResult(ActivityResultContracts.TakePicturePreview()) { bitmap ->
        if (bitmap != null) viewModel.setCameraImage(bitmap)
    }
    Column(
        // targetSdk 35 draws edge to edge: keep clear of the status bar, the cut-out and the keyboard
        modifier = Modifier.fillMaxSize().safeDrawingPadding().verticalScroll(rememberScrollState()).padding(16.dp),
        verticalArrangement = Arrangement.spacedBy(12.dp)
    ) {
        Text("VLM-Pruner Edge", style = MaterialTheme.typography.headlineSmall)
        state.scanError?.let { ErrorCard(it, onDismiss = viewModel::dismissScanError) }
        state.error?.let { ErrorCard(it, onDismiss = viewModel::dismissError) }
        state.warning?.let { Text(it, color = MaterialTheme.colorScheme.tertiary) }

        ModelPicker("Model A", state.models, state.modelA, viewModel::selectA)
        Row(verticalAlignment = Alignment.CenterVertically) {
            Switch(checked = state.compare, onCheckedChange = viewModel::setCompare)
            Spacer(Modifier.width(8.dp))
            Text("Compare with model B (same image and question; loaded one after the other)")
        }
        if (state.compare) ModelPicker("Model B", state.models, state.modelB, viewModel::selectB)
        Row(verticalAlignment = Alignment.CenterVertically) {
            Switch(checked = state.encoderTiming, onCheckedChange = viewModel::setEncoderTiming)
            Spacer(Modifier.width(8.dp))
            Text("Also time the vision encoder alone (loads it once more)")
        }
        TextButton(onClick = viewModel::rescan) { Text("Rescan model folders") }

        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            Button(onClick = {
                pickImage.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly))
            }) { Text("Photo") }
            OutlinedButton(onClick = { takePicture.launch(null) }) { Text("Camera") }
        }
        state.preview?.let {
            Image(
                bitmap = it.asImageBitmap(),
                contentDescription = "Selected image",
                modifier = Modifier.fillMaxWidth().height(220.dp),
                contentScale = ContentScale.Fit
            )
        }
        OutlinedTextField(
            value = state.question,
            onValueChange = viewModel::setQuestion,
            label = { Text("Question") },
            modifier = Modifier.fillMaxWidth()
        )
        Text("Answer length: at most ${state.maxNewTokens} tokens")
        Slider(
            value = state.maxNewTokens.toFloat(),
            onValueChange = { viewModel.setMaxNewTokens(it.toInt()) },
            valueRange = MIN_TOKENS..MAX_TOKENS
        )
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            Button(onClick = viewModel::run, enabled = !state.busy) { Text(if (state.compare) "Run both" else "Run") }
            OutlinedButton(onClick = viewModel::stop, enabled = state.busy) { Text("Stop") }
        }
        if (state.status.isNotEmpty()) Text(state.status, style = MaterialTheme.typography.bodySmall)

        for (card in state.cards) RunCardView(card)
        state.comparison?.let { StatsCard("Speed-up of ${it.b.modelName} over ${it.a.modelName}", it.lines()) }
    }
}

private const val MIN_TOKENS = 16f
private const val MAX_TOKENS = 256f

@Composable
private fun ModelPicker(label: String, models: List<ModelFolder>, selected: String?, onSelect: (String) -> Unit) {
    var expanded by remember { mutableStateOf(false) }
    val current = models.firstOrNull { it.name == selected }
    Column {
        Text(label, style = MaterialTheme.typography.labelLarge)
        Box {
            OutlinedButton(onClick = { expanded = true }, modifier = Modifier.fillMaxWidth()) {
                Text(current?.let { "${it.name}\n${it.summary()}" } ?: "no model")
            }
            DropdownMenu(expanded = expanded, onDismissRequest = { expanded = false }) {
                for (model in models) {
                    DropdownMenuItem(
                        text = { Text("${model.name}\n${model.summary()}") },
                        onClick = {
                            expanded = false
                            onSelect(model.name)
                        },
                        enabled = model.usable
                    )
                }
            }
        }
        current?.problem?.let { Text(it, color = MaterialTheme.colorScheme.error) }
    }
}

@Composable
private fun ErrorCard(error: ErrorInfo, onDismiss: () -> Unit) {
    val clipboard = LocalClipboardManager.current
    Card(colors = CardDefaults.cardColors(containerColor = MaterialTheme.colorScheme.errorContainer)) {
        Column(Modifier.padding(12.dp), verticalArrangement = Arrangement.spacedBy(8.dp)) {
            Text(error.title, fontWeight = FontWeight.Bold)
            Text(error.message)
            error.command?.let { command ->
                SelectionContainer { Text(command, fontFamily = FontFamily.Monospace) }
                TextButton(onClick = { clipboard.setText(AnnotatedString(command)) }) { Text("Copy commands") }
            }
            TextButton(onClick = onDismiss) { Text("Dismiss") }
        }
    }
}

@Composable
private fun RunCardView(card: RunCard) {
    Card(modifier = Modifier.fillMaxWidth()) {
        Column(Modifier.padding(12.dp), verticalArrangement = Arrangement.spacedBy(6.dp)) {
            Text(card.folder, fontWeight = FontWeight.Bold)
            Text(if (card.answer.isEmpty() && card.running) "…" else card.answer)
            card.note?.let { Text(it, style = MaterialTheme.typography.bodySmall) }
            card.measurement?.let { StatsTable(it.lines()) }
        }
    }
}

@Composable
private fun StatsCard(title: String, lines: List<Pair<String, String>>) {
    Card(
        modifier = Modifier.fillMaxWidth(),
        colors = CardDefaults.cardColors(containerColor = MaterialTheme.colorScheme.secondaryContainer)
    ) {
        Column(Modifier.padding(12.dp), verticalArrangement = Arrangement.spacedBy(6.dp)) {
            Text(title, fontWeight = FontWeight.Bold)
            StatsTable(lines)
        }
    }
}

@Composable
private fun StatsTable(lines: List<Pair<String, String>>) {
    Column(verticalArrangement = Arrangement.spacedBy(2.dp)) {
        for ((label, value) in lines) {
            Row(modifier = Modifier.fillMaxWidth(), horizontalArrangement = Arrangement.SpaceBetween) {
                Text(label, style = MaterialTheme.typography.bodySmall, modifier = Modifier.weight(1f))
                Spacer(Modifier.width(8.dp))
                Text(value, style = MaterialTheme.typography.bodySmall, fontWeight = FontWeight.Medium)
            }
        }
    }
}
